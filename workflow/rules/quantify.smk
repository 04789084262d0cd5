rule quantify:
    """Every endpoint of one patient: lesion ER and eligibility, organs, lobe T/N per SPECT time point, cycles."""
    input:
        ingest=f"{RESULTS}/{{patient}}/ingest",
        register=f"{RESULTS}/{{patient}}/register",
    output:
        report(
            directory(f"{RESULTS}/{{patient}}/quantify"),
            patterns=["{name}.tsv"],
            caption="../report/patient_tables.rst",
            category="Endpoints",
            subcategory="{patient}",
        ),
    params:
        # the validated config (overrides and schema defaults included): a change reruns the job
        config=stage_config(config, "quantify", "physical_bounds", "plausibility"),
        on_error=config["on_patient_error"],
    log:
        f"{RESULTS}/logs/quantify/{{patient}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/quantify/{{patient}}.tsv"
    conda:
        "../../envs/prrtquant.yaml"
    threads: 1
    resources:
        mem_mb=2000,
    script:
        "../../scripts/quantify.py"
