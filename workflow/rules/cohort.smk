rule cohort_series:
    """All patients' series tables stacked, with the patient pseudonym as first column."""
    input:
        series=expand(f"{RESULTS}/{{patient}}/series.tsv", patient=PATIENTS.index),
    output:
        table=f"{RESULTS}/cohort/series.tsv",
    params:
        patients=list(PATIENTS.index),
    log:
        f"{RESULTS}/logs/cohort_series.log",
    conda:
        "../../envs/prrtquant.yaml"
    threads: 1
    resources:
        mem_mb=500,
    script:
        "../../scripts/cohort_stack.py"


rule cohort_inventory:
    """All patients' ingest inventories stacked, with the patient pseudonym as first column."""
    input:
        ingest=expand(f"{RESULTS}/{{patient}}/ingest", patient=PATIENTS.index),
    output:
        table=f"{RESULTS}/cohort/inventory.tsv",
    params:
        patients=list(PATIENTS.index),
    log:
        f"{RESULTS}/logs/cohort_inventory.log",
    conda:
        "../../envs/prrtquant.yaml"
    threads: 1
    resources:
        mem_mb=500,
    script:
        "../../scripts/cohort_stack.py"
