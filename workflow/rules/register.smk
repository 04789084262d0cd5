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
        config_file=lambda wildcards: workflow.configfiles[-1] if workflow.configfiles else "",
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
