rule index_dicom:
    """Header-only index of every series in one patient's DICOM export."""
    input:
        dicom=dicom_dir,
    output:
        series=f"{RESULTS}/{{patient}}/series.tsv",
    log:
        f"{RESULTS}/logs/index_dicom/{{patient}}.log",
    conda:
        "../../envs/prrtquant.yaml"
    threads: 1
    resources:
        mem_mb=1000,
    script:
        "../../scripts/index_dicom.py"
