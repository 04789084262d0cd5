"""Snakemake entry point: stack per-patient tables into one cohort table."""


from prrtquant.cli import main


def run(tables: list[str], patients: list[str], out: str, log: str) -> int:
    args = ["stack", "--out", out, "--log", log]
    for p, t in zip(patients, tables):
        args += ["--table", f"{p}={t}"]
    return main(args)


if "snakemake" in globals():
    sm = globals()["snakemake"]
    if "series" in sm.input.keys():
        tables = list(sm.input.series)
    else:  # ingest folders: stack their inventories
        tables = [f"{d}/inventory.tsv" for d in sm.input.ingest]
    raise SystemExit(run(tables, list(sm.params.patients), sm.output.table, sm.log[0]))
