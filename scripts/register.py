"""Snakemake entry point: register one patient's sessions (see `prrtquant register --help`)."""

from typing import Any, Mapping

from prrtquant.cli import main_with_config


def run(ingest_dir: str, out: str, config: Mapping[str, Any], log: str, on_error: str = "fail") -> int:
    return main_with_config(["register", ingest_dir, "--out", out, "--log", log, "--on-error", on_error], config)


if "snakemake" in globals():
    sm = globals()["snakemake"]
    raise SystemExit(run(sm.input.ingest, sm.output[0], sm.params.config, sm.log[0], sm.params.on_error))
