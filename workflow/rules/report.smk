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


rule patient_page:
    """One page per patient for the report: decision, lesions, lobar T/N, doses against limits, QC, flags."""
    input:
        register=f"{RESULTS}/{{patient}}/register",
        quantify=f"{RESULTS}/{{patient}}/quantify",
        dosimetry=f"{RESULTS}/{{patient}}/dosimetry",
    output:
        page=report(
            f"{RESULTS}/{{patient}}/report/{{patient}}.html",
            caption="../report/patient_page.rst",
            category="Patients",
            subcategory="{patient}",
        ),
    log:
        f"{RESULTS}/logs/patient_page/{{patient}}.log",
    conda:
        "../../envs/prrtquant.yaml"
    threads: 1
    resources:
        mem_mb=500,
    script:
        "../../scripts/patient_page.py"
