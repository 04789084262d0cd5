"""Snakemake entry point: every patient's registration QC in one table (see `prrtquant qc --help`)."""

from prrtquant.cli import main


def run(register_dirs: list[str], patients: list[str], out: str, log: str) -> int:
    args = ["qc", "--out", out, "--log", log]
    for p, d in zip(patients, register_dirs):
        args += ["--register", f"{p}={d}"]
    return main(args)


if "snakemake" in globals():
    sm = globals()["snakemake"]
    raise SystemExit(run(list(sm.input.register), list(sm.params.patients), sm.output.table, sm.log[0]))
