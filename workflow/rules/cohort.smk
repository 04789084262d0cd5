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


rule cohort:
    """Cohort endpoints: stacked tables, eligibility count, paired lobar T/N comparison, plots; failed patients listed."""
    input:
        quantify=expand(f"{RESULTS}/{{patient}}/quantify", patient=PATIENTS.index),
        dosimetry=expand(f"{RESULTS}/{{patient}}/dosimetry", patient=PATIENTS.index),
    output:
        **{name: f"{RESULTS}/cohort/{name}.tsv" for name in COHORT_TABLES if name != "eligibility"},
        eligibility=report(
            f"{RESULTS}/cohort/eligibility.tsv",
            caption="../report/eligibility.rst",
            category="Cohort",
        ),
        summary=f"{RESULTS}/cohort/summary.json",
        bounds=f"{RESULTS}/cohort/physical_bounds.tsv",
        bounds_html=report(
            f"{RESULTS}/cohort/physical_bounds.html",
            caption="../report/physical_bounds.rst",
            category="Cohort",
        ),
        er_plot=report(
            f"{RESULTS}/cohort/plots/er_distribution.png",
            caption="../report/er_distribution.rst",
            category="Cohort",
        ),
        lobar_plot=report(
            f"{RESULTS}/cohort/plots/lobar_tn_paired.png",
            caption="../report/lobar_tn_paired.rst",
            category="Cohort",
        ),
        route_plot=report(
            f"{RESULTS}/cohort/plots/uptake_by_route.png",
            caption="../report/uptake_by_route.rst",
            category="Cohort",
        ),
    params:
        patients=list(PATIENTS.index),
        out=lambda wildcards, output: os.path.dirname(output.summary),
    log:
        f"{RESULTS}/logs/cohort.log",
    conda:
        "../../envs/prrtquant.yaml"
    threads: 1
    resources:
        mem_mb=1000,
    script:
        "../../scripts/cohort.py"
