"""Snakemake entry point: quantification of one patient (see `prrtquant quantify --help`)."""

from prrtquant.cli import main


def run(ingest_dir: str, register_dir: str, out: str, config_file: str, log: str, on_error: str = "fail") -> int:
    args = ["quantify", ingest_dir, register_dir, "--out", out, "--log", log, "--on-error", on_error]
    if config_file:
        args += ["--config", config_file]
    return main(args)


if "snakemake" in globals():
    sm = globals()["snakemake"]
    raise SystemExit(run(sm.input.ingest, sm.input.register, sm.output[0], str(sm.params.config_file), sm.log[0],
                         sm.params.on_error))
