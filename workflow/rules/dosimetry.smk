rule dosimetry:
    """177Lu SPECT dosimetry: TACs, fits (AICc / chi-square rule), TIA, residence time, dose (local, kernel, S-value), BED, limits."""
    input:
        ingest=f"{RESULTS}/{{patient}}/ingest",
        register=f"{RESULTS}/{{patient}}/register",
    output:
        report(
            directory(f"{RESULTS}/{{patient}}/dosimetry"),
            patterns=["tac/{name}.png"],
            caption="../report/dosimetry.rst",
            category="Dosimetry",
            subcategory="{patient}",
        ),
    params:
        # the validated config (overrides and schema defaults included): a change reruns the job
        config=stage_config(config, "dosimetry", "quantify", "physical_bounds"),
        on_error=config["on_patient_error"],
    log:
        f"{RESULTS}/logs/dosimetry/{{patient}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/dosimetry/{{patient}}.tsv"
    conda:
        "../../envs/prrtquant.yaml"
    threads: 2
    resources:
        mem_mb=3000,
    script:
        "../../scripts/dosimetry.py"
