rule registration_qc:
    """Every patient's registration QC in one table for the report: failed checks are listed, never hidden."""
    input:
        register=expand(f"{RESULTS}/{{patient}}/register", patient=PATIENTS.index),
    output:
        table=report(
            f"{RESULTS}/cohort/registration_qc.tsv",
            caption="../report/registration_qc_table.rst",
            category="Registration QC",
        ),
    params:
        patients=list(PATIENTS.index),
    log:
        f"{RESULTS}/logs/registration_qc.log",
    conda:
        "../../envs/prrtquant.yaml"
    threads: 1
    resources:
        mem_mb=500,
    script:
        "../../scripts/registration_qc.py"
