"""Snakemake entry point: one patient's HTML page for the report (see `prrtquant page --help`)."""

from prrtquant.cli import main


def run(patient: str, register: str, quantify: str, dosimetry: str, out: str, log: str) -> int:
    return main(["page", patient, "--register", register, "--quantify", quantify, "--dosimetry", dosimetry,
                 "--out", out, "--log", log])


if "snakemake" in globals():
    sm = globals()["snakemake"]
    raise SystemExit(run(sm.wildcards.patient, sm.input.register, sm.input.quantify, sm.input.dosimetry,
                         sm.output.page, sm.log[0]))
