"""Snakemake entry point: cohort tables, eligibility count, lobar comparison and plots (see `prrtquant cohort --help`)."""

from prrtquant.cli import main


def run(quantify_dirs: list[str], dosimetry_dirs: list[str], patients: list[str], out: str, log: str) -> int:
    args = ["cohort", "--out", out, "--log", log]
    for p, q, d in zip(patients, quantify_dirs, dosimetry_dirs):
        args += ["--quantify", f"{p}={q}", "--dosimetry", f"{p}={d}"]
    return main(args)


if "snakemake" in globals():
    sm = globals()["snakemake"]
    raise SystemExit(run(list(sm.input.quantify), list(sm.input.dosimetry), list(sm.params.patients),
                         sm.params.out, sm.log[0]))
