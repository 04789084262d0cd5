"""The ``prrtquant`` command: one sub-command per workflow stage.

Each sub-command is a thin layer over a library function, so a physicist can run one step on
one patient by hand, and tests can call :func:`main` directly with an argument list.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

from . import __version__

log = logging.getLogger("prrtquant")


def _time_points(text: str) -> tuple[tuple[float, ...], ...]:
    """``"4,24;24"`` -> ((4.0, 24.0), (24.0,)): SPECT hours per cycle."""
    try:
        cycles = tuple(tuple(float(h) for h in c.split(",")) for c in text.split(";"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: hours per cycle, e.g. '4,24,72;24'") from None
    if not cycles or any(not c or any(not 0 < h < 1000 for h in c) for c in cycles):
        raise argparse.ArgumentTypeError(f"{text!r}: every cycle needs hours between 0 and 1000")
    return cycles


def _cmd_phantom(args: argparse.Namespace) -> int:
    from .phantom.generator import generate_patient

    truth = generate_patient(
        args.out, design=args.design, size=args.size, seed=args.seed, pseudonym=args.pseudonym,
        mean_er=args.mean_er, n_lesions=args.n_lesions, n_extrahepatic=args.n_extrahepatic,
        treated_lobe=args.treated_lobe, noise=args.noise, deformation=args.deformation,
        messy_names=args.messy_names, spect_format=args.spect_format,
        nm_negative_spacing=args.nm_negative_spacing, with_mr=args.mr, layout=args.layout,
        camera_cps_per_mbq=args.camera_cps_per_mbq, emission_own_frame=args.emission_own_frame,
        ct_slice_mm=args.ct_slice_mm, spect_time_points=args.spect_time_points)
    er = truth["enhancement_ratio"]
    log.info("wrote %s: %s design, %d lesions, %d sessions; true mean ER %.2f (eligible: %s)",
             args.out, truth["design"], len(truth["lesions"]), len(truth["sessions"]),
             er["true_patient"]["mean"], er["true_patient"]["eligible"])
    return 0


def _cmd_index(args: argparse.Namespace) -> int:
    from .dicom.index import index_dicom
    from .io import atomic_path

    res = index_dicom(args.dicom_dir)
    with atomic_path(args.out) as tmp:
        res.series.to_csv(tmp, sep="\t", index=False)
    bad = res.series[res.series.note != ""]
    for r in bad.itertuples():
        log.warning("%s: %s", r.first_file, r.note)
    log.info("%s: %d series, %d unusable DICOM files, %d non-DICOM files ignored", args.dicom_dir,
             len(res.series) - len(bad), len(bad), len(res.non_dicom))
    return 0


def _load_config(path: Path | None) -> dict:
    """The config validated against the workflow's schema, defaults filled in (no file: the defaults)."""
    from .config import load_config

    return load_config(path)


def _cmd_ingest(args: argparse.Namespace) -> int:
    from .stages.ingest import IngestConfig, PatientSheet, ingest

    cfg = _load_config(args.config)
    sheet_path = args.sheet or (Path(cfg["patients"]) if "patients" in cfg else None)
    if sheet_path is not None:
        sheet = PatientSheet.from_tsv(sheet_path, args.patient)
    else:
        sheet = PatientSheet(patient=args.patient)
    settings = IngestConfig.from_dict(cfg["ingest"], cfg["physical_bounds"], fail_on_bounds=args.on_error == "fail",
                                      plausibility=cfg["plausibility"])
    inv = ingest(args.dicom_dir, args.out, sheet, settings)
    log.info("%s: inventory of %d rows in %s", args.patient, len(inv), args.out / "inventory.tsv")
    return 0


def _cmd_register(args: argparse.Namespace) -> int:
    from .stages.register import register_patient, settings_from_config

    cfg = _load_config(args.config)
    settings, stage = settings_from_config(cfg.get("registration"))
    summary = register_patient(args.ingest_dir, args.out, settings, **stage)
    log.info("registration to %s: %s", summary["reference_session"],
             "FLAGGED (" + ", ".join(summary["failed_sessions"]) + ")" if summary["flagged"] else "all QC passed")
    return 0


def _cmd_quantify(args: argparse.Namespace) -> int:
    from .bounds import BoundsSettings
    from .plausibility import PlausibilitySettings
    from .stages.quantify import QuantifySettings, quantify_patient

    cfg = _load_config(args.config)
    elig = quantify_patient(args.ingest_dir, args.register_dir, args.out, QuantifySettings.from_config(cfg["quantify"]),
                            bounds=BoundsSettings.from_config(cfg["physical_bounds"]),
                            fail_on_bounds=args.on_error == "fail",
                            plausibility_rules=PlausibilitySettings.from_config(cfg["plausibility"]))
    log.info("ER statistic %s = %s (threshold %s): eligible %s%s", elig["statistic"], elig["value"],
             elig["threshold"], elig["eligible"], " [flagged]" if elig.get("flagged") else "")
    return 0


def _cmd_dosimetry(args: argparse.Namespace) -> int:
    from .dosimetry import settings_from_config
    from .stages.dosimetry import dosimetry_patient
    from .stages.regions import RegionSettings

    cfg = _load_config(args.config)
    from .bounds import BoundsSettings

    summary = dosimetry_patient(args.ingest_dir, args.register_dir, args.out, settings_from_config(cfg["dosimetry"]),
                                region_settings=RegionSettings.from_config(cfg["quantify"]),
                                bounds=BoundsSettings.from_config(cfg["physical_bounds"]),
                                fail_on_bounds=args.on_error == "fail")
    flags = [f"{x['region']} {x['quantity']} ({x['method']}) {x['value_gy']:.2f} Gy > {x['limit_gy']:g} Gy"
             for x in summary.get("limits_exceeded") or []]
    if summary.get("physical_bounds"):
        log.warning("dosimetry: %d physically impossible value(s) flagged (see summary.json physical_bounds)",
                    len(summary["physical_bounds"]))
    log.info("dosimetry: %d cycle(s)%s", len(summary.get("cycles") or {}),
             f"; limits exceeded (flagged, not decided): {'; '.join(flags)}" if flags else ", no limit exceeded")
    return 0


def _patient_paths(specs: Sequence[str], option: str) -> dict[str, Path]:
    """``PATIENT=PATH`` arguments of a repeated option, in order."""
    out: dict[str, Path] = {}
    for spec in specs:
        patient, _, path = spec.partition("=")
        if not patient or not path:
            raise ValueError(f"{option} {spec!r}: expected PATIENT=PATH")
        out[patient] = Path(path)
    return out


def _cmd_stack(args: argparse.Namespace) -> int:
    import pandas as pd

    from .io import atomic_path, read_failure
    from .stages.cohort import stack_tables

    frames: dict[str, pd.DataFrame | None] = {}
    for patient, path in _patient_paths(args.table, "--table").items():
        if read_failure(Path(path).parent) is not None:
            log.warning("%s: %s failed earlier, left out of the stack", patient, path)
            continue
        frames[patient] = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    out = stack_tables(frames)
    with atomic_path(args.out) as tmp:
        out.to_csv(tmp, sep="\t", index=False)
    log.info("stacked %d tables (%d rows) into %s", len(frames), len(out), args.out)
    return 0


def _cmd_cohort(args: argparse.Namespace) -> int:
    from .stages.cohort import cohort_summary

    cohort_summary(_patient_paths(args.quantify, "--quantify"), args.out,
                   dosimetry_dirs=_patient_paths(args.dosimetry, "--dosimetry"))
    return 0


def _cmd_page(args: argparse.Namespace) -> int:
    from .stages.report import write_patient_page

    path = write_patient_page(args.out, args.patient, args.register, args.quantify, args.dosimetry)
    log.info("%s: patient page %s", args.patient, path)
    return 0


def _cmd_qc(args: argparse.Namespace) -> int:
    from .io import atomic_path
    from .stages.cohort import registration_qc_table

    table = registration_qc_table(_patient_paths(args.register, "--register"))
    with atomic_path(args.out) as tmp:
        table.to_csv(tmp, sep="\t", index=False)
    failed = table[~table.passed.astype(bool)]
    log.info("%d registrations, %d failed QC%s", len(table), len(failed),
             (": " + ", ".join(f"{r.patient} {r.session}" for r in failed.itertuples())) if len(failed) else "")
    return 0


def _get_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    common.add_argument("--log", type=Path, help="also write the log to this file")
    stage = argparse.ArgumentParser(add_help=False, parents=[common])
    stage.add_argument("--on-error", choices=["fail", "record"], default="fail",
                       help="on bad input: fail (exit 2, no output) or record the error in OUT/FAILED.json and "
                            "exit 0, so later stages and the cohort list the patient as failed (default: fail)")
    p = argparse.ArgumentParser(prog="prrtquant", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"prrtquant {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _add_phantom(sub, common)
    _add_stages(sub, common, stage)
    _add_cohort(sub, common)
    return p


def _add_phantom(sub: Any, common: argparse.ArgumentParser) -> None:
    """The ``phantom`` sub-command: one synthetic patient."""
    ph = sub.add_parser("phantom", parents=[common], help="write one synthetic patient (DICOM + truth.json)",
                        description="Write one synthetic PRRT patient as DICOM, with truth.json and sheet.json.")
    ph.add_argument("--out", required=True, type=Path, help="output directory (must not exist or be empty)")
    ph.add_argument("--design", choices=["whole_liver_ia", "lobar_ia"], default="whole_liver_ia")
    ph.add_argument("--size", choices=["tiny", "small", "clinical"], default="tiny")
    ph.add_argument("--seed", type=int, default=0)
    ph.add_argument("--pseudonym", help="patient pseudonym (default SYN<seed>)")
    ph.add_argument("--mean-er", type=float, help="true mean enhancement ratio of the IA-enhanced lesions")
    ph.add_argument("--n-lesions", type=int, help="liver target lesions, 2-6")
    ph.add_argument("--n-extrahepatic", type=int, choices=[1, 2])
    ph.add_argument("--treated-lobe", choices=["left", "right"], help="lobar design: the IA-treated lobe")
    ph.add_argument("--noise", type=float, default=0.0, help="relative emission noise level (0: noise free)")
    ph.add_argument("--deformation", action="store_true", help="smooth liver deformation between sessions")
    ph.add_argument("--messy-names", action="store_true", help="clinical ROI names ('Rt lobe', 'Target 1', ...)")
    ph.add_argument("--spect-format", default="nm_counts",
                    choices=["nm_counts", "nm_counts_scaled", "nm_bqml", "nm_bqml_rescale", "nm_bqml_rwv_rescale",
                             "nm_starguide", "pt_bqml"],
                    help="how SPECT values are stored: integer counts; counts scaled by RescaleSlope (Units CNTS); "
                         "Bq/mL by Real World Value Mapping; Bq/mL by RescaleSlope with Units BQML; both agreeing; "
                         "GE StarGuide counts (duration in ImageComments, activity and injection time only in "
                         "spect_sheet.tsv); Bq/mL as PET objects")
    ph.add_argument("--nm-negative-spacing", action="store_true",
                    help="NM frames head to feet with negative SpacingBetweenSlices")
    ph.add_argument("--mr", action="store_true", help="add an MR session with target lesions drawn on it")
    ph.add_argument("--layout", choices=["pacs", "flat"], default="pacs")
    ph.add_argument("--emission-own-frame", action="store_true",
                    help="give every PET and SPECT its own frame of reference and pose (registered to its CT)")
    ph.add_argument("--camera-cps-per-mbq", type=float, default=9.6, help="SPECT camera sensitivity")
    ph.add_argument("--ct-slice-mm", type=float,
                    help="CT slice spacing in mm instead of the size's (tiny: 6 mm; same axial extent)")
    ph.add_argument("--spect-time-points", type=_time_points, metavar="H,H;H",
                    help="SPECT hours after each cycle's injection, cycles separated by ';' (e.g. '4,24,72;24'; "
                         "default: the design's)")
    ph.set_defaults(func=_cmd_phantom)


def _add_stages(sub: Any, common: argparse.ArgumentParser, stage: argparse.ArgumentParser) -> None:
    """One sub-command per per-patient stage: index, ingest, register, quantify, dosimetry."""
    ix = sub.add_parser("index", parents=[common], help="header-only index of the series in a DICOM folder",
                        description="List every DICOM series below DICOM_DIR (headers only) as a TSV.")
    ix.add_argument("dicom_dir", type=Path)
    ix.add_argument("--out", required=True, type=Path, help="series table (TSV)")
    ix.set_defaults(func=_cmd_index)

    ig = sub.add_parser("ingest", parents=[stage], help="DICOM export -> NIfTI images and masks with inventory",
                        description="Convert one patient's DICOM export into physical images (CT in HU, PET in "
                                    "Bq/mL with SUV factors, SPECT in Bq/mL, MR) and masks, with inventory.tsv.")
    ig.add_argument("dicom_dir", type=Path)
    ig.add_argument("--out", required=True, type=Path, help="output folder (replaced atomically)")
    ig.add_argument("--patient", required=True, help="the patient's pseudonym (row of the patient sheet)")
    ig.add_argument("--sheet", type=Path, help="patient sheet TSV (default: `patients` of --config)")
    ig.add_argument("--config", type=Path, help="workflow config.yaml (its `ingest` section is used)")
    ig.set_defaults(func=_cmd_ingest)

    rg = sub.add_parser("register", parents=[stage], help="register sessions, carry masks to emission grids, QC",
                        description="Register every session's CT to the reference CT, propagate the reference "
                                    "masks onto every PET/SPECT grid (binary and fractional), write QC.")
    rg.add_argument("ingest_dir", type=Path, help="output folder of `prrtquant ingest`")
    rg.add_argument("--out", required=True, type=Path)
    rg.add_argument("--config", type=Path, help="workflow config.yaml (its `registration` section is used)")
    rg.set_defaults(func=_cmd_register)

    for name, func, help_, description, config_help in (
        ("quantify", _cmd_quantify, "endpoints: lesions, eligibility, organs, lobe T/N, cycles",
         "Per-lesion SUVmean/max/peak on IA and IV PET, enhancement ratios, eligibility, tumour-to-liver ratio and "
         "SSTR positivity, organs at risk; per SPECT time point lobe T/N (lobar design) and every region's uptake "
         "per cycle. Writes lesions.tsv, eligibility.json, organs.tsv, lobes.tsv, lobe_lesions.tsv, cycles.tsv, "
         "quantify.json.",
         "workflow config.yaml (its `quantify` section is used)"),
        ("dosimetry", _cmd_dosimetry, "177Lu SPECT dosimetry: TACs, fits, TIA, residence time, absorbed dose, BED",
         "Per region and cycle: activity at every SPECT time point (tac.tsv), mono/bi/tri-exponential and "
         "uptake-washout fits (AICc where defined, else the fewest parameters passing chi-square), trapezoid + "
         "physical tail, single-time-point methods (fits.tsv), TIA, residence time, absorbed dose by local "
         "deposition, voxel-kernel convolution and S-values, kidney BED, cumulative doses vs limits "
         "(dosimetry.tsv), DVHs, dose maps as NIfTI and RTDOSE, TAC plots.",
         "workflow config.yaml (its `dosimetry` section, and the region definition of its `quantify` section, "
         "are used)"),
    ):
        sp = sub.add_parser(name, parents=[stage], help=help_, description=description)
        sp.add_argument("ingest_dir", type=Path)
        sp.add_argument("register_dir", type=Path)
        sp.add_argument("--out", required=True, type=Path)
        sp.add_argument("--config", type=Path, help=config_help)
        sp.set_defaults(func=func)


def _add_cohort(sub: Any, common: argparse.ArgumentParser) -> None:
    """The cohort and report sub-commands: cohort, qc, page, stack."""
    co = sub.add_parser("cohort", parents=[common], help="cohort tables, eligibility count, lobar comparison, plots",
                        description="Stack every patient's quantify tables, count eligible patients, compare treated "
                                    "vs control lobe T/N across lobar patients (paired t-test on log T/N, geometric "
                                    "mean ratio with 95%% CI, Wilcoxon), plot; failed patients are listed.")
    co.add_argument("--quantify", action="append", default=[], metavar="PATIENT=DIR",
                    help="a patient's quantify folder (repeat per patient)")
    co.add_argument("--dosimetry", action="append", default=[], metavar="PATIENT=DIR",
                    help="a patient's dosimetry folder (repeat per patient; dosimetry.tsv is stacked)")
    co.add_argument("--out", required=True, type=Path, help="cohort folder (e.g. results/cohort)")
    co.set_defaults(func=_cmd_cohort)

    qc = sub.add_parser("qc", parents=[common], help="one table of every patient's registration QC",
                        description="One row per patient and registration: metric, inverse consistency, body "
                                    "Dice, passed, reasons (a patient whose registration did not run is listed).")
    qc.add_argument("--register", action="append", default=[], metavar="PATIENT=DIR",
                    help="a patient's register folder (repeat per patient)")
    qc.add_argument("--out", required=True, type=Path)
    qc.set_defaults(func=_cmd_qc)

    pg = sub.add_parser("page", parents=[common], help="one patient's page (HTML): decision, tables, doses, QC, flags",
                        description="Write one self-contained HTML page for one patient: the IA decision with its "
                                    "value and definition, lesions, lobar T/N, TIA / dose / BED per cycle and "
                                    "cumulative against the limits, registration QC and every flag.")
    pg.add_argument("patient", help="the patient's pseudonym")
    pg.add_argument("--register", required=True, type=Path, help="the patient's register folder")
    pg.add_argument("--quantify", required=True, type=Path, help="the patient's quantify folder")
    pg.add_argument("--dosimetry", type=Path, help="the patient's dosimetry folder")
    pg.add_argument("--out", required=True, type=Path, help="the HTML file")
    pg.set_defaults(func=_cmd_page)

    sk = sub.add_parser("stack", parents=[common], help="stack per-patient tables into a cohort table")
    sk.add_argument("--table", action="append", default=[], metavar="PATIENT=PATH", help="repeat per patient")
    sk.add_argument("--out", required=True, type=Path)
    sk.set_defaults(func=_cmd_stack)



def main(argv: Sequence[str] | None = None) -> int:
    parser = _get_parser()
    args = parser.parse_args(argv)
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if args.log:
        args.log.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(args.log))
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, handlers=handlers, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("highdicom").setLevel(logging.WARNING)
    from .io import read_failure, write_failure

    for folder in (getattr(args, a, None) for a in ("ingest_dir", "register_dir")):
        failure = read_failure(folder) if folder is not None else None
        if failure is not None:  # an earlier stage recorded a failure: pass it on, do not crash
            log.error("%s: not run, %s failed earlier: %s", args.command, failure["stage"], failure["error"])
            write_failure(args.out, failure["stage"], failure["error"], upstream=True)
            return 0
    try:
        return int(args.func(args))
    except (OSError, ValueError, KeyError) as exc:
        if isinstance(exc, OSError) and exc.filename is not None:  # one line naming the path, no traceback
            log.error("%s: %s", exc.filename, exc.strerror or exc)
        else:
            log.error("%s", exc)
        if getattr(args, "on_error", "fail") == "record":
            write_failure(args.out, args.command, str(exc))
            log.error("%s: failure recorded in %s (the cohort lists this patient as failed)", args.command,
                      Path(args.out) / "FAILED.json")
            return 0
        return 2


def main_with_config(argv: Sequence[str], config: Mapping[str, Any]) -> int:
    """:func:`main` with ``--config`` set to a temporary YAML file holding ``config``.

    The workflow's scripts call this with the config sections their stage reads, as Snakemake holds
    them (``--config`` overrides and schema defaults included), so a job never re-reads a raw file.
    """
    import tempfile

    import yaml

    with tempfile.TemporaryDirectory(prefix="prrtquant-config-") as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(yaml.safe_dump(_plain(config), sort_keys=False))
        return main([*argv, "--config", str(path)])


def _plain(o: Any) -> Any:
    """Snakemake's config containers (dict/list subclasses) as plain dicts and lists for YAML."""
    if isinstance(o, Mapping):
        return {str(k): _plain(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_plain(v) for v in o]
    return o


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
