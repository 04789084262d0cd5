rule quantify_pet:
    """PET endpoints (Bordeaux design): per-lesion uptake and ER, eligibility, organs at risk."""
    input:
        ingest=f"{RESULTS}/{{patient}}/ingest",
        register=f"{RESULTS}/{{patient}}/register",
    output:
        directory(f"{RESULTS}/{{patient}}/quantify"),
    params:
        config_file=lambda wildcards: workflow.configfiles[-1] if workflow.configfiles else "",
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
