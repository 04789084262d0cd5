"""Snakemake entry point: ingest one patient's DICOM export (see `prrtquant ingest --help`)."""

from typing import Any, Mapping

from prrtquant.cli import main_with_config


def run(dicom_dir: str, out: str, patient: str, sheet: str, config: Mapping[str, Any], log: str,
        on_error: str = "fail") -> int:
    return main_with_config(["ingest", dicom_dir, "--out", out, "--patient", patient, "--sheet", sheet, "--log", log,
                             "--on-error", on_error], config)


if "snakemake" in globals():
    sm = globals()["snakemake"]
    raise SystemExit(run(sm.input.dicom, sm.output[0], sm.wildcards.patient, sm.input.sheet, sm.params.config,
                         sm.log[0], sm.params.on_error))
