"""Snakemake entry point: header-only index of one patient's DICOM export."""


from prrtquant.cli import main


def run(dicom_dir: str, out: str, log: str) -> int:
    return main(["index", dicom_dir, "--out", out, "--log", log])


if "snakemake" in globals():
    sm = globals()["snakemake"]
    raise SystemExit(run(sm.input.dicom, sm.output.series, sm.log[0]))
