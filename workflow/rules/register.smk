rule register:
    """Every session's CT to the reference CT; reference masks onto every PET/SPECT grid; QC and overlays."""
    input:
        ingest=f"{RESULTS}/{{patient}}/ingest",
    output:
        report(
            directory(f"{RESULTS}/{{patient}}/register"),
            patterns=["qc/{name}.png"],
            caption="../report/registration_qc.rst",
            category="Registration QC",
            subcategory="{patient}",
        ),
    params:
        # the validated config (overrides and schema defaults included): a change reruns the job
        config=stage_config(config, "registration"),
        on_error=config["on_patient_error"],
    log:
        f"{RESULTS}/logs/register/{{patient}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/register/{{patient}}.tsv"
    conda:
        "../../envs/prrtquant.yaml"
    threads: 2
    resources:
        mem_mb=3000,
    script:
        "../../scripts/register.py"
