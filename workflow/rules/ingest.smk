rule ingest:
    """DICOM export -> NIfTI images (CT HU, PET Bq/mL + SUV factors, SPECT Bq/mL, MR) and masks, with inventory."""
    input:
        dicom=dicom_dir,
        sheet=config["patients"],
    output:
        directory(f"{RESULTS}/{{patient}}/ingest"),
    params:
        # the validated config (overrides and schema defaults included): a change reruns the job
        config=stage_config(config, "ingest", "physical_bounds", "plausibility"),
        on_error=config["on_patient_error"],
    log:
        f"{RESULTS}/logs/ingest/{{patient}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/ingest/{{patient}}.tsv"
    conda:
        "../../envs/prrtquant.yaml"
    threads: 1
    resources:
        mem_mb=3000,
    script:
        "../../scripts/ingest.py"
