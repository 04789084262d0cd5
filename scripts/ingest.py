"""Snakemake entry point: ingest one patient's DICOM export (see `prrtquant ingest --help`)."""

from prrtquant.cli import main


def run(dicom_dir: str, out: str, patient: str, sheet: str, config_file: str, log: str, on_error: str = "fail") -> int:
    args = ["ingest", dicom_dir, "--out", out, "--patient", patient, "--sheet", sheet, "--log", log, "--on-error", on_error]
    if config_file:
        args += ["--config", config_file]
    return main(args)


if "snakemake" in globals():
    sm = globals()["snakemake"]
    raise SystemExit(run(sm.input.dicom, sm.output[0], sm.wildcards.patient, sm.input.sheet,
                         str(sm.params.config_file), sm.log[0],
                         sm.params.on_error))
