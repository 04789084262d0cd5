"""Ingest: a hospital DICOM export → physical images (NIfTI + JSON sidecar) with provenance.

``ingest(dicom_dir, out_dir, sheet=..., config=...)``

1. indexes every file by header only (non-DICOM files are listed and ignored),
2. classifies series (CT, PT, NM, MR, RTSTRUCT, SEG) and groups them into sessions by study,
3. labels sessions from header facts (radionuclide, injection and acquisition times) and the
   per-patient sheet (which PET study was the IA one, the camera calibration, a weight override):
   ``pet_iv``, ``pet_ia``, ``spect_c{cycle}_{hours}h``, ``mr``, ``ct``,
4. converts: CT in HU, PET in Bq/mL with SUV factors (QIBA rules, :mod:`prrtquant.suv`), SPECT in
   Bq/mL (counts / (calibration × duration × voxel volume), or as stored), MR as stored; masks from
   RTSTRUCT (exact rasterisation), DICOM-SEG (placed by position) and NIfTI label maps, with ROI
   names mapped to canonical names (unmapped ones are written and listed, never dropped),
5. writes ``out_dir/inventory.tsv`` (one row per written file) atomically: everything is built in
   a temporary folder next to ``out_dir`` and renamed at the end, so a failure leaves nothing.

No patient name, ID or birth date is written anywhere: the patient is known by its pseudonym.
"""

from __future__ import annotations

import datetime as dt
import gzip
import json
import logging
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd
import pydicom
import SimpleITK as sitk

from . import __version__
from .dicom_values import combine, parse_datetime
from .dicom_series import SeriesError, load_sliced_series, rescaled_volume
from .geometry import Grid
from .io import atomic_directory, is_dicom_file, sha256_of, sidecar_of
from .masks import MaskError, contour_distance_maps, rasterize_rtstruct, rtstruct_rois
from .bounds import DEFAULT_TOLERANCE, BoundsSettings, Violation, check_activity, raise_if_any
from .plausibility import Flag, ImplausibleValue, PlausibilitySettings, check_range, flag_range
from .nm import NMGeometryError, NMValueError, acquisition_duration_s, read_nm, to_bqml_at_start
from .radionuclides import RADIONUCLIDES
from .roi_names import RoiMapper
from .suv import total_dose_bq

log = logging.getLogger(__name__)

INVENTORY_COLUMNS = ["series_instance_uid", "modality", "session", "role", "roi", "units", "path",
                     "source_roi_name", "mask_source", "study_instance_uid", "frame_of_reference_uid",
                     "acquisition_datetime", "radionuclide", "route", "cycle", "hours_pi", "note", "fine_path", "distance_path"]

#: RTSTRUCT contours are also rasterised on an in-plane grid this fine (mm), so that registration can carry
#: their sub-voxel shape onto emission grids (written as masks/rtstruct_fine/, cropped to the ROI).
FINE_MASK_MM = 1.0
#: contour distance maps get slices interpolated (monotone cubic) to at most this spacing
CONTOUR_SLICE_MM = 2.0

IDENTIFYING_TAGS = ("PatientName", "PatientID", "PatientBirthDate", "OtherPatientIDs", "OtherPatientNames")


class IngestError(ValueError):
    """Bad input: the message names the file or series and the problem."""


SPECT_SHEET_COLUMNS = ("series_instance_uid", "injection_datetime", "injected_activity_mbq", "acquisition_duration_s",
                       "camera_cps_per_mbq", "decay_reference")


@dataclass(frozen=True)
class SpectSheetRow:
    """What one SPECT series' header lacks, given by the user (a row of the patient's SPECT sheet).

    Every field is optional; a value given here is used instead of the header's, and the sidecar
    records which one was used (``value_sources``) and the header's value when they differ.
    """

    series_instance_uid: str
    injection_datetime: dt.datetime | None = None
    injected_activity_mbq: float | None = None
    acquisition_duration_s: float | None = None
    camera_cps_per_mbq: float | None = None
    decay_reference: str | None = None  # START or ADMIN: what CorrectedImage DECY refers to


def _positive(value: str, what: str) -> float:
    try:
        v = float(value)
    except ValueError:
        raise IngestError(f"{what}: {value!r} is not a number") from None
    if not (math.isfinite(v) and v > 0):
        raise IngestError(f"{what}: {value!r} must be a positive number")
    return v


def read_spect_sheet(path: str | Path) -> dict[str, SpectSheetRow]:
    """The SPECT sheet (TSV, one row per SPECT series; columns :data:`SPECT_SHEET_COLUMNS`, all but the
    first optional), keyed by SeriesInstanceUID."""
    path = Path(path)
    try:
        df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise IngestError(f"{path}: cannot read the SPECT sheet ({exc})") from exc
    unknown = sorted(set(df.columns) - set(SPECT_SHEET_COLUMNS))
    if unknown or "series_instance_uid" not in df.columns:
        raise IngestError(f"{path}: SPECT sheet columns must be among {list(SPECT_SHEET_COLUMNS)} and include "
                          f"series_instance_uid (unknown: {unknown})")
    out: dict[str, SpectSheetRow] = {}
    for n, row in enumerate(df.to_dict("records"), start=2):
        where = f"{path} line {n}"
        uid = str(row["series_instance_uid"]).strip()
        if not uid or uid in out:
            raise IngestError(f"{where}: series_instance_uid {'missing' if not uid else 'repeated: ' + uid}")
        get = {k: str(row.get(k, "")).strip() for k in SPECT_SHEET_COLUMNS}
        inj = None
        if get["injection_datetime"]:
            try:
                inj = dt.datetime.fromisoformat(get["injection_datetime"]).replace(tzinfo=None)
            except ValueError:
                raise IngestError(f"{where}: injection_datetime {get['injection_datetime']!r} is not an ISO date-time "
                                  f"(e.g. 2026-03-02T09:15:00)") from None
        ref = get["decay_reference"].upper() or None
        if ref not in (None, "START", "ADMIN"):
            raise IngestError(f"{where}: decay_reference {ref!r} must be START or ADMIN")
        out[uid] = SpectSheetRow(
            uid, inj,
            _positive(get["injected_activity_mbq"], f"{where} injected_activity_mbq") if get["injected_activity_mbq"] else None,
            _positive(get["acquisition_duration_s"], f"{where} acquisition_duration_s") if get["acquisition_duration_s"] else None,
            _positive(get["camera_cps_per_mbq"], f"{where} camera_cps_per_mbq") if get["camera_cps_per_mbq"] else None,
            ref)
    return out


@dataclass(frozen=True)
class PatientSheet:
    """What the DICOM headers cannot say (one row of the patient sheet)."""

    patient: str
    design: str | None = None
    ia_pet_study_instance_uid: str | None = None
    treated_lobe: str | None = None
    camera_cps_per_mbq: float | None = None
    weight_kg: float | None = None
    spect: Mapping[str, SpectSheetRow] = field(default_factory=dict)  #: per SPECT series (``spect_sheet`` column)

    @classmethod
    def from_row(cls, row: Mapping[str, Any], base_dir: str | Path | None = None) -> "PatientSheet":
        """One sheet row; ``base_dir``: folder that relative paths in it (``spect_sheet``) are relative to."""
        def opt(key: str) -> str | None:
            v = row.get(key)
            return None if v is None or (isinstance(v, float) and math.isnan(v)) or str(v).strip() == "" else str(v).strip()

        def optf(key: str) -> float | None:
            v = opt(key)
            return None if v is None else float(v)

        spect_sheet = opt("spect_sheet")
        spect = read_spect_sheet(Path(base_dir or ".") / spect_sheet) if spect_sheet else {}
        return cls(patient=str(row["patient"]), design=opt("design"),
                   ia_pet_study_instance_uid=opt("ia_pet_study_instance_uid"), treated_lobe=opt("treated_lobe"),
                   camera_cps_per_mbq=optf("camera_cps_per_mbq"), weight_kg=optf("weight_kg"), spect=spect)

    @classmethod
    def from_tsv(cls, path: str | Path, patient: str) -> "PatientSheet":
        df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
        from .config import validate_sheet_row

        rows = df[df["patient"] == patient]
        if rows.empty:
            raise IngestError(f"{path}: no row for patient {patient!r}")
        if len(rows) > 1:
            raise IngestError(f"{path}: {len(rows)} rows for patient {patient!r} (pseudonyms must be unique)")
        row = rows.iloc[0].to_dict()
        validate_sheet_row(row, str(path))  # the same schema as the workflow's
        return cls.from_row(row, base_dir=Path(path).parent)


@dataclass
class IngestConfig:
    """The ingest part of the workflow config (all optional)."""

    roi_map: dict[str, list[str]] = field(default_factory=dict)
    camera_cps_per_mbq: float | None = None  # default when the sheet has none
    weight_fallback: str = "error"  # "error" or "sheet": use the sheet's weight only when the header has none
    spect_hours_rounding: float = 1.0  # hours after injection rounded to this for session names
    spect_decay_reference: str | None = None  # START / ADMIN: what NM CorrectedImage DECY refers to, when unsaid
    activity_tolerance: float = DEFAULT_TOLERANCE  # physical_bounds.activity_tolerance
    fail_on_bounds: bool = False  # a physically impossible SPECT activity stops ingest (on_patient_error: fail)
    plausibility: PlausibilitySettings = field(default_factory=PlausibilitySettings)  # config plausibility

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None, bounds: Mapping[str, Any] | None = None,
                  fail_on_bounds: bool = False, plausibility: Mapping[str, Any] | None = None) -> "IngestConfig":
        d = dict(d or {})
        ref = d.get("spect_decay_reference")
        return cls(roi_map=dict(d.get("roi_map", {}) or {}), camera_cps_per_mbq=d.get("camera_cps_per_mbq"),
                   weight_fallback=str(d.get("weight_fallback", "error")),
                   spect_hours_rounding=float(d.get("spect_hours_rounding", 1.0)),
                   spect_decay_reference=None if ref is None else str(ref).upper(),
                   activity_tolerance=BoundsSettings.from_config(bounds).activity_tolerance,
                   fail_on_bounds=fail_on_bounds, plausibility=PlausibilitySettings.from_config(plausibility))


# ----------------------------------------------------------------------------- indexing

@dataclass
class SeriesRecord:
    uid: str
    modality: str
    sop_class: str
    study_uid: str
    frame_uid: str
    header: pydicom.Dataset  # first file's header (no pixels)
    paths: list[Path] = field(default_factory=list)
    kind: str = ""  # ct, mr, pet, spect_nm, spect_pt, rtstruct, seg, ignored
    session: str = ""
    note: str = ""


#: file name endings of DICOM files in exports (a file so named that is not readable DICOM is refused)
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima", ".dc3")
#: files that exports carry beside the images, never DICOM
NOT_DICOM_SUFFIXES = (".txt", ".xml", ".json", ".tsv", ".csv", ".html", ".htm", ".pdf", ".png", ".jpg", ".jpeg",
                      ".md", ".log", ".ini", ".zip", ".tfm", ".yaml", ".yml", ".exe", ".inf", ".bat", ".sh")
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"  # DICOMDIR


def _looks_like_dicom(p: Path, folder_has_dicom: bool) -> bool:
    """A file that is not Part 10 DICOM but should be: empty, named like DICOM, or named like its DICOM
    neighbours (no suffix, or a number) in a folder of DICOM files."""
    name = p.name.lower()
    if name.startswith(".") or name.endswith(NOT_DICOM_SUFFIXES) or name in ("version", "lockfile", "readme"):
        return False
    if name.endswith(DICOM_SUFFIXES):
        return True
    stem_only = "." not in name or name.rsplit(".", 1)[1].isdigit()
    return folder_has_dicom and stem_only


def _read_header(p: Path) -> pydicom.Dataset:
    try:
        return pydicom.dcmread(p, stop_before_pixels=True)
    except Exception as exc:  # noqa: BLE001
        raise IngestError(f"{p}: unreadable DICOM header ({exc})") from exc


def scan(root: Path) -> tuple[dict[str, SeriesRecord], list[Path], list[Path]]:
    """Header-only index: series, NIfTI files, other (ignored) files.

    A file without the DICOM preamble that looks like part of the export (:func:`_looks_like_dicom`:
    ``.dcm``, or named like its DICOM neighbours, no suffix or a number) is refused, naming it: empty,
    unreadable, or DICOM without the Part 10 header: an unreadable slice is never silently left out of its
    series.
    """
    series: dict[str, SeriesRecord] = {}
    nifti: list[Path] = []
    other: list[Path] = []
    for dirpath, _, filenames in os.walk(root):
        paths = [Path(dirpath) / fn for fn in sorted(filenames)]
        dicom = {p for p in paths if not p.name.endswith((".nii", ".nii.gz")) and is_dicom_file(p)}
        # does this folder hold images (a DICOMDIR at a CD's root beside README, LICENSE, ... does not count)?
        images = any(p.name.upper() != "DICOMDIR" for p in dicom)
        for p in paths:
            if p.name.endswith((".nii", ".nii.gz")):
                nifti.append(p)
                continue
            if p in dicom:
                ds = _read_header(p)
            elif _looks_like_dicom(p, images):
                if not p.is_file():
                    raise IngestError(f"{p}: not a readable file (a broken link?) among the DICOM files of {p.parent}")
                if p.stat().st_size == 0:
                    raise IngestError(f"{p}: empty file among the DICOM files of {p.parent} (a slice lost in the "
                                      f"export? export the series again, or remove the file if it is not one)")
                try:
                    ds = pydicom.dcmread(p, stop_before_pixels=True, force=True)
                    readable = bool(getattr(ds, "SOPClassUID", None))
                except Exception:  # noqa: BLE001
                    readable = False
                if not readable:
                    raise IngestError(f"{p}: not a readable DICOM file, although it sits among the DICOM files of "
                                      f"{p.parent} (a damaged slice? export the series again, or remove the file)")
                raise IngestError(f"{p}: DICOM without the Part 10 preamble and file meta information (an old or "
                                  f"raw export), not supported: export the series again as DICOM files (Part 10)")
            else:
                other.append(p)
                continue
            if str(getattr(ds, "SOPClassUID", "")) == MEDIA_STORAGE_DIRECTORY:
                other.append(p)  # DICOMDIR: an index of the files, not an image
                continue
            uid = str(getattr(ds, "SeriesInstanceUID", "") or "")
            if not uid:
                raise IngestError(f"{p}: DICOM file without SeriesInstanceUID")
            rec = series.get(uid)
            if rec is None:
                rec = series[uid] = SeriesRecord(
                    uid=uid, modality=str(getattr(ds, "Modality", "")), sop_class=str(getattr(ds, "SOPClassUID", "")),
                    study_uid=str(getattr(ds, "StudyInstanceUID", "")),
                    frame_uid=str(getattr(ds, "FrameOfReferenceUID", "")), header=ds)
            rec.paths.append(p)
    return series, sorted(nifti), sorted(other)


# ----------------------------------------------------------------------------- classification

def _radionuclide(ds: pydicom.Dataset) -> str | None:
    from .suv import radionuclide_of

    seq = getattr(ds, "RadiopharmaceuticalInformationSequence", None)
    return radionuclide_of(seq[0]) if seq else None


def _parse_dt(date: str | None, time: str | None) -> dt.datetime | None:
    try:
        return combine(date, time)
    except ValueError:
        return None


def _parse_datetime(value: str | None) -> dt.datetime | None:
    try:
        return parse_datetime(value)[0]
    except ValueError:
        return None


def _injection(ds: pydicom.Dataset) -> dt.datetime | None:
    seq = getattr(ds, "RadiopharmaceuticalInformationSequence", None)
    if not seq:
        return None
    item = seq[0]
    t = _parse_datetime(getattr(item, "RadiopharmaceuticalStartDateTime", None))
    if t is None and getattr(item, "RadiopharmaceuticalStartTime", None):
        t = _parse_dt(str(getattr(ds, "SeriesDate", "")), str(item.RadiopharmaceuticalStartTime))
        acq = _parse_dt(str(getattr(ds, "SeriesDate", "")), str(getattr(ds, "SeriesTime", "")))
        if t is not None and acq is not None and t > acq:
            t -= dt.timedelta(days=1)  # injected before midnight, scanned after
    return t


def _spect_injection(rec: SeriesRecord, sheet: PatientSheet) -> tuple[dt.datetime | None, str]:
    """Injection date-time of a SPECT series and where it came from: the SPECT sheet when it gives one
    (e.g. GE StarGuide exports carry no usable administration time), else the header."""
    row = sheet.spect.get(rec.uid)
    if row is not None and row.injection_datetime is not None:
        return row.injection_datetime, "sheet"
    return _injection(rec.header), "header: RadiopharmaceuticalInformationSequence"


def _route(ds: pydicom.Dataset) -> str | None:
    seq = getattr(ds, "RadiopharmaceuticalInformationSequence", None)
    if not seq:
        return None
    r = str(getattr(seq[0], "RadiopharmaceuticalRoute", "")).lower()
    if not r:
        return None
    if "arter" in r or r in ("ia", "i.a."):
        return "IA"
    if "ven" in r or r in ("iv", "i.v."):
        return "IV"
    return None


def _series_datetime(ds: pydicom.Dataset) -> dt.datetime | None:
    return (_parse_dt(getattr(ds, "SeriesDate", None), getattr(ds, "SeriesTime", None))
            or _parse_dt(getattr(ds, "AcquisitionDate", None), getattr(ds, "AcquisitionTime", None))
            or _parse_dt(getattr(ds, "StudyDate", None), getattr(ds, "StudyTime", None)))


def _iso(t: dt.datetime | None) -> str:
    return t.isoformat() if t else ""


def classify(series: dict[str, SeriesRecord]) -> None:
    for rec in series.values():
        m, ds = rec.modality, rec.header
        if m == "CT":
            rec.kind = "ct"
        elif m == "MR":
            rec.kind = "mr"
        elif m == "PT":
            nuc = _radionuclide(ds)
            rec.kind = "spect_pt" if nuc == "Lu-177" else "pet"
        elif m == "NM":
            types = [str(t).upper() for t in getattr(ds, "ImageType", [])]
            if "RECON TOMO" in types or "RECON GATED TOMO" in types:
                rec.kind = "spect_nm"
            else:
                rec.kind, rec.note = "ignored", "NM object that is not a tomographic reconstruction"
        elif m == "RTSTRUCT":
            rec.kind = "rtstruct"
        elif m == "SEG":
            rec.kind = "seg"
        else:
            rec.kind, rec.note = "ignored", f"modality {m or '?'} not used"


def label_sessions(series: dict[str, SeriesRecord], sheet: PatientSheet, cfg: IngestConfig,
                   flags: list[Flag] | None = None) -> dict[str, dict[str, Any]]:
    """Session id per study, from header facts and the sheet. Returns session facts by id.

    SPECT studies are grouped into cycles by their injection date-time: administrations less than
    ``plausibility.min_cycle_interval_days`` apart are one cycle's, and must agree to within
    ``plausibility.injection_agreement_min`` (flagged, appended to ``flags``, when they do not) and to
    within 12 h (refused otherwise: a wrong date in one header never becomes a new cycle).
    """
    flags = [] if flags is None else flags
    by_study: dict[str, list[SeriesRecord]] = {}
    for rec in series.values():
        if rec.kind in ("ct", "mr", "pet", "spect_nm", "spect_pt"):
            by_study.setdefault(rec.study_uid, []).append(rec)
    facts: dict[str, dict[str, Any]] = {}
    study_session: dict[str, str] = {}

    pet_studies = {s: [r for r in recs if r.kind == "pet"] for s, recs in by_study.items()}
    pet_studies = {s: r for s, r in pet_studies.items() if r}
    spect_studies = {s: [r for r in recs if r.kind in ("spect_nm", "spect_pt")] for s, recs in by_study.items()}
    spect_studies = {s: r for s, r in spect_studies.items() if r}

    # -- PET: which one followed the IA injection
    ia_study: str | None = None
    if sheet.ia_pet_study_instance_uid:
        if sheet.ia_pet_study_instance_uid not in pet_studies:
            raise IngestError(f"patient sheet: ia_pet_study_instance_uid {sheet.ia_pet_study_instance_uid} is not a "
                              f"PET study of this export (PET studies: {sorted(pet_studies)})")
        ia_study = sheet.ia_pet_study_instance_uid
        routes = {s: _route(r[0].header) for s, r in pet_studies.items()}
        if routes.get(ia_study) == "IV":
            log.warning("study %s: the sheet says IA, the header route says intravenous; the sheet wins", ia_study)
    else:
        candidates = [s for s, r in pet_studies.items() if _route(r[0].header) == "IA"]
        if len(candidates) > 1:
            raise IngestError(f"two candidate IA PET studies ({', '.join(candidates)}) and no "
                              f"ia_pet_study_instance_uid in the patient sheet for {sheet.patient}")
        ia_study = candidates[0] if candidates else None
    pet_sorted = sorted(pet_studies, key=lambda s: _series_datetime(pet_studies[s][0].header) or dt.datetime.min)
    iv_count = 0
    for s in pet_sorted:
        rec = pet_studies[s][0]
        route = "IA" if s == ia_study else "IV"
        if route == "IV":
            iv_count += 1
            sid = "pet_iv" if iv_count == 1 else f"pet_iv_{iv_count}"
        else:
            sid = "pet_ia"
        study_session[s] = sid
        facts[sid] = {"route": route, "radionuclide": _radionuclide(rec.header),
                      "route_source": "sheet" if sheet.ia_pet_study_instance_uid else "header"}

    # -- SPECT: cycles by injection time, hours after injection
    rules = cfg.plausibility
    spect_info: dict[str, tuple[dt.datetime, dt.datetime]] = {}
    for s, recs in spect_studies.items():
        inj, _ = _spect_injection(recs[0], sheet)
        acq = _series_datetime(recs[0].header)
        if inj is None or acq is None:
            raise IngestError(f"SPECT series {recs[0].uid} ({recs[0].paths[0]}): injection or acquisition date/time "
                              f"missing (RadiopharmaceuticalStartDateTime, SeriesDate/SeriesTime; the injection may "
                              f"be given in the patient's SPECT sheet)")
        if acq < inj - dt.timedelta(minutes=1):
            raise IngestError(f"SPECT series {recs[0].uid} ({recs[0].paths[0]}): acquired {acq} before its injection "
                              f"{inj} (RadiopharmaceuticalStartDateTime or SeriesDate/SeriesTime wrong)")
        spect_info[s] = (inj, acq)
    # one cycle = administrations closer than min_cycle_interval_days (single linkage in time)
    cycles: list[list[str]] = []
    for s in sorted(spect_info, key=lambda k: spect_info[k][0]):
        if cycles and (spect_info[s][0] - spect_info[cycles[-1][0]][0]) < dt.timedelta(
                days=rules.min_cycle_interval_days):  # measured from the cycle's first administration
            cycles[-1].append(s)
        else:
            cycles.append([s])
    cycle_of: dict[str, int] = {}
    for n, members in enumerate(cycles, start=1):
        times = [spect_info[m][0] for m in members]
        first = min(members, key=lambda m: spect_info[m][0])
        last = max(members, key=lambda m: spect_info[m][0])
        spread_min = (max(times) - min(times)).total_seconds() / 60.0
        if spread_min >= 12 * 60:
            a, b = spect_studies[first][0], spect_studies[last][0]
            raise IngestError(
                f"SPECT series {b.uid} ({b.paths[0]}): injection {spect_info[last][0]} and SPECT series {a.uid} "
                f"({a.paths[0]}): injection {spect_info[first][0]} are {spread_min / 60:.1f} h apart, less than "
                f"plausibility.min_cycle_interval_days ({rules.min_cycle_interval_days:g} d): one cycle's SPECTs "
                f"must share one administration (a wrong RadiopharmaceuticalStartDateTime? correct it, or give "
                f"injection_datetime in the patient's SPECT sheet)")
        if spread_min > rules.injection_agreement_min:
            b = spect_studies[last][0]
            flags.append(Flag("ingest", "injection_disagreement_min", spread_min, 0.0, rules.injection_agreement_min,
                              "min", f"cycle {n}",
                              f"{b.paths[0]}: RadiopharmaceuticalStartDateTime vs the cycle's other SPECT series"))
        for m in members:
            cycle_of[m] = n
    for s, (inj, acq) in sorted(spect_info.items(), key=lambda kv: kv[1][1]):
        cycle = cycle_of[s]
        hours = (acq - inj).total_seconds() / 3600.0
        nominal = round(hours / cfg.spect_hours_rounding) * cfg.spect_hours_rounding
        base = f"spect_c{cycle}_{nominal:g}h"
        sid, n = base, 1
        while sid in facts:
            n += 1
            sid = f"{base}_{n}"
        study_session[s] = sid
        facts[sid] = {"cycle": cycle, "hours_pi": hours, "nominal_hours_pi": nominal,
                      "route": _route(spect_studies[s][0].header), "radionuclide": "Lu-177",
                      "injection_datetime": inj.isoformat()}
    # -- MR and CT-only studies
    for kind in ("mr", "ct"):
        for s, recs in sorted(by_study.items(), key=lambda kv: _series_datetime(kv[1][0].header) or dt.datetime.min):
            if s in study_session or not any(r.kind == kind for r in recs):
                continue
            sid, n = kind, 1
            while sid in facts:
                n += 1
                sid = f"{kind}_{n}"
            study_session[s] = sid
            facts[sid] = {}
    for rec in series.values():
        if rec.kind in ("ct", "mr", "pet", "spect_nm", "spect_pt"):
            rec.session = study_session[rec.study_uid]
    return facts


# ----------------------------------------------------------------------------- writing

def _write_image(img: sitk.Image, path: Path, sidecar: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # ITK's NIfTI writer compresses at zlib's default level, which dominates ingest time on clinical
    # CTs; write plain NIfTI and gzip it at level 1 instead (most of the size gain, a fraction of the time)
    raw = path.with_name(path.name[: -len(".gz")])
    sitk.WriteImage(img, str(raw), useCompression=False)
    # no file name and mtime 0 in the gzip header: the same image gives the same bytes (and SHA-256) every run
    with open(raw, "rb") as src, open(path, "wb") as fh, \
            gzip.GzipFile(filename="", mode="wb", fileobj=fh, compresslevel=1, mtime=0) as dst:
        shutil.copyfileobj(src, dst, length=16 * 1024 * 1024)
    raw.unlink()
    sidecar = {**sidecar, "sha256": sha256_of(path)}  # checked by every later reader (prrtquant.io.read_image)
    sidecar_of(path).write_text(json.dumps(sidecar, indent=1, default=str))


def _image(arr: np.ndarray, grid: Grid, dtype: Any = np.float32) -> sitk.Image:
    return grid.image(np.ascontiguousarray(arr.astype(dtype)))


def _scanner(ds: pydicom.Dataset) -> dict[str, str]:
    return {"manufacturer": str(getattr(ds, "Manufacturer", "")),
            "model": str(getattr(ds, "ManufacturerModelName", "")),
            "station": str(getattr(ds, "StationName", ""))}


def _safe(name: str) -> str:
    s = re.sub(r"[^A-Za-z0-9_.-]+", "_", name.strip()).strip("_")
    return s or "unnamed"


@dataclass
class _Ctx:
    out: Path
    rows: list[dict[str, Any]]
    grids: dict[str, Grid]  # series uid -> grid of written image
    mapper: RoiMapper
    bounds: list[Violation] = field(default_factory=list)  # physically impossible values found
    flags: list[Flag] = field(default_factory=list)  # implausible values that may be real (config plausibility)

    def add(self, **kw: Any) -> None:
        row = {c: "" for c in INVENTORY_COLUMNS}
        row.update({k: ("" if v is None else v) for k, v in kw.items()})
        self.rows.append(row)


def _base_row(rec: SeriesRecord, facts: dict[str, Any]) -> dict[str, Any]:
    return {"series_instance_uid": rec.uid, "modality": rec.modality, "session": rec.session,
            "study_instance_uid": rec.study_uid, "frame_of_reference_uid": rec.frame_uid,
            "acquisition_datetime": _iso(_series_datetime(rec.header)),
            "radionuclide": facts.get("radionuclide"), "route": facts.get("route"), "cycle": facts.get("cycle"),
            "hours_pi": "" if facts.get("hours_pi") is None else f"{facts['hours_pi']:.3f}"}


def _ingest_ct_mr(ctx: _Ctx, rec: SeriesRecord, facts: dict[str, Any]) -> None:
    try:
        s = load_sliced_series(rec.paths, rec.uid)
    except SeriesError as exc:
        raise IngestError(str(exc)) from exc
    vol = rescaled_volume(s)
    kind = rec.kind
    rel = Path(rec.session) / f"{kind}.nii.gz"
    n = 1
    while (ctx.out / rel).exists():
        n += 1
        rel = Path(rec.session) / f"{kind}_{n}.nii.gz"
    units = "HU" if kind == "ct" else "arbitrary"
    dtype = np.int16 if vol.dtype == np.int32 and -32768 <= vol.min() and vol.max() <= 32767 else np.float32
    side = {"modality": rec.modality, "units": units, "source_series_instance_uid": rec.uid,
            "study_instance_uid": rec.study_uid, "frame_of_reference_uid": rec.frame_uid,
            "acquisition_datetime": _series_datetime(rec.header), "scanner": _scanner(rec.header),
            "series_description": str(getattr(rec.header, "SeriesDescription", "")), "n_slices": s.grid.size[2],
            "prrtquant_version": __version__}
    _write_image(_image(vol, s.grid, dtype), ctx.out / rel, side)
    ctx.grids[rec.uid] = s.grid
    ctx.add(**_base_row(rec, facts), role=kind, units=units, path=str(rel))


def _ingest_pet(ctx: _Ctx, rec: SeriesRecord, facts: dict[str, Any], sheet: PatientSheet, cfg: IngestConfig) -> None:
    from .suv import SuvError, convert_pet_series

    try:
        s = load_sliced_series(rec.paths, rec.uid)
    except SeriesError as exc:
        raise IngestError(str(exc)) from exc
    override = None
    notes: list[str] = []
    header_weight = getattr(rec.header, "PatientWeight", None)
    if sheet.weight_kg is not None:
        if cfg.weight_fallback == "sheet" and header_weight not in (None, "", 0, "0"):
            notes.append("sheet weight ignored: the header has PatientWeight (weight_fallback: sheet)")
        else:
            override = sheet.weight_kg
            notes.append("weight from the patient sheet")
    try:
        conv = convert_pet_series(s.datasets, weight_kg_override=override, source=f"{s.paths[0]} (series {rec.uid})")
    except SuvError as exc:
        raise IngestError(str(exc)) from exc
    flags = _pet_plausibility(rec, s.paths[0], conv, override, cfg.plausibility)
    ctx.flags.extend(flags)
    rel = Path(rec.session) / "pet.nii.gz"
    side = {"modality": "PT", "units": "Bq/mL", "quantity": "activity concentration",
            "radionuclide": conv.radionuclide, "half_life_s": conv.half_life_s,
            "injected_activity_bq": conv.injected_activity_bq, "injection_datetime": conv.injection_time.isoformat(),
            "acquisition_datetime": (_series_datetime(rec.header) or conv.reference_time).isoformat(),
            "decay_correction": conv.decay_correction, "decay_corrected_to": conv.reference_time.isoformat(),
            "units_in_header": conv.units_in, "suv_bw_factor": conv.suv_bw_factor,
            "sul_james_factor": conv.sul_james_factor, "sul_janmahasatian_factor": conv.sul_janmahasatian_factor,
            "suv_bsa_factor": conv.suv_bsa_factor, "weight_kg": conv.weight_kg, "height_m": conv.height_m,
            "sex": conv.sex, "route": facts.get("route"), "route_source": facts.get("route_source"),
            "source_series_instance_uid": rec.uid, "study_instance_uid": rec.study_uid,
            "frame_of_reference_uid": rec.frame_uid, "scanner": _scanner(rec.header),
            "notes": notes + list(conv.notes), "plausibility": [f.as_dict() for f in flags],
            "prrtquant_version": __version__}
    _write_image(_image(conv.bqml, s.grid), ctx.out / rel, side)
    ctx.grids[rec.uid] = s.grid
    ctx.add(**_base_row(rec, facts), role="pet", units="Bq/mL", path=str(rel),
            note="; ".join(f.message for f in flags))


def _pet_plausibility(rec: SeriesRecord, path: Path, conv: Any, override: float | None,
                      rules: PlausibilitySettings) -> list[Flag]:
    """Refuse a PET whose weight or administered activity no patient has; flag a height (Type 3, only for
    SUL and SUV-BSA) outside its range, an uptake time outside the protocol's and a sheet weight that
    disagrees with the header's (config ``plausibility``)."""
    where = f"{path} (series {rec.uid})"
    hw_kg = conv.header_weight_kg  # the SUV conversion's reading (grams rule included)
    try:
        if override is None:
            check_range(conv.weight_kg, rules.weight_kg, "PatientWeight (0010,1030)", "kg", where)
        else:
            check_range(conv.weight_kg, rules.weight_kg, "weight_kg of the patient sheet", "kg",
                        f"patient sheet (for {where})")
        if conv.radionuclide == "Ga-68":
            check_range(conv.injected_activity_bq / 1e6, rules.pet_activity_mbq,
                        "RadionuclideTotalDose (0018,1074)", "MBq", where)
    except ImplausibleValue as exc:
        raise IngestError(str(exc)) from None
    flags: list[Flag] = []
    if conv.height_m is not None:
        flags += flag_range(conv.height_m, rules.height_m, "height_m", "m", rec.session,
                            f"{where}: PatientSize (0010,1020)")
    if override is not None and hw_kg is not None and abs(override - hw_kg) > rules.sheet_weight_rtol * hw_kg:
        flags.append(Flag("ingest", "sheet_weight_kg", float(override), hw_kg * (1 - rules.sheet_weight_rtol),
                          hw_kg * (1 + rules.sheet_weight_rtol), "kg", rec.session,
                          f"patient sheet weight_kg vs PatientWeight {hw_kg:g} kg of {where}"))
    scan = conv.scan_start or _series_datetime(rec.header) or conv.reference_time  # the SUV's own scan start
    uptake_min = (scan - conv.injection_time).total_seconds() / 60.0
    if not (-1.0 <= uptake_min <= 360.0):  # a minute of clock skew between injector and scanner tolerated
        raise IngestError(f"{where}: injection (RadiopharmaceuticalStartDateTime {conv.injection_time}) to scan "
                          f"({scan}) is {uptake_min:.0f} min; a PET is acquired 0-360 min after the injection "
                          f"(wrong date or time?)")
    flags += flag_range(uptake_min, rules.pet_uptake_min, "uptake_time_min", "min", rec.session,
                        f"{where}: RadiopharmaceuticalStartDateTime to SeriesTime")
    for f in flags:
        log.warning("%s", f.message)
    return flags


def _spect_values(rec: SeriesRecord, row: SpectSheetRow | None, cfg: IngestConfig, notes: list[str],
                  sources: dict[str, str]) -> tuple[np.ndarray, Grid, str, str, float | None]:
    """Read a SPECT series: (values, grid, units BQML/CNTS, decay reference NONE/START/ADMIN, duration s or None)."""
    where = f"{rec.paths[0]} (series {rec.uid})"
    ds = rec.header
    duration = None
    if rec.kind == "spect_nm":
        if len(rec.paths) != 1:
            raise IngestError(f"series {rec.uid}: {len(rec.paths)} NM files in one reconstruction series; expected one "
                              f"multi-frame object")
        reference = (row.decay_reference if row is not None and row.decay_reference else None) or cfg.spect_decay_reference
        try:
            nm = read_nm(rec.paths[0], decay_reference=reference)
        except (NMGeometryError, NMValueError, ValueError, EOFError, OSError) as exc:
            raise IngestError(f"{rec.paths[0]} (series {rec.uid}): {exc}") from exc
        notes.extend(nm.notes)
        sources["values"] = f"header: {nm.mapping}"
        sources["decay_correction"] = nm.decay_correction_source
        grid = Grid.of(nm.image)
        arr = sitk.GetArrayFromImage(nm.image)
        units, dc = nm.units, nm.decay_correction
    else:
        try:
            s = load_sliced_series(rec.paths, rec.uid)
        except SeriesError as exc:
            raise IngestError(str(exc)) from exc
        units = str(getattr(ds, "Units", "")).upper()
        if units != "BQML":
            raise IngestError(f"{where}: SPECT exported as PET with Units {units!r}; only BQML is understood")
        dc = (str(getattr(ds, "DecayCorrection", "")) or "NONE").upper()
        if dc not in ("NONE", "START", "ADMIN"):
            raise IngestError(f"{where}: DecayCorrection {dc!r} not understood (NONE, START, ADMIN)")
        grid = s.grid
        arr = rescaled_volume(s)
        sources["values"] = "header: RescaleSlope/RescaleIntercept per slice, Units BQML"
        sources["decay_correction"] = "header: DecayCorrection"
    header_duration = acquisition_duration_s(ds)
    if row is not None and row.acquisition_duration_s is not None:
        duration = row.acquisition_duration_s
        sources["acquisition_duration"] = "sheet"
        if header_duration and abs(header_duration[0] - duration) > 0.01 * duration:
            notes.append(f"acquisition duration {duration:g} s from the SPECT sheet; the header says "
                         f"{header_duration[0]:g} s ({header_duration[1]})")
    elif header_duration is not None:
        duration, sources["acquisition_duration"] = header_duration
    return np.asarray(arr, dtype=np.float64), grid, units, dc, duration


def _ingest_spect(ctx: _Ctx, rec: SeriesRecord, facts: dict[str, Any], sheet: PatientSheet, cfg: IngestConfig) -> None:
    """A 177Lu SPECT series → Bq/mL at acquisition start, with where every value came from.

    Counts → Bq/mL: counts / (calibration cps/MBq × duration s) × 1e6 / voxel mL. Values not decay
    corrected (and counts) are the mean over the acquisition: divided by the mean decay factor over it,
    they refer to the acquisition start. ADMIN-corrected values are decayed back to the acquisition start.
    """
    ds = rec.header
    where = f"{rec.paths[0]} (series {rec.uid})"
    row = sheet.spect.get(rec.uid)
    notes: list[str] = []
    sources: dict[str, str] = {}
    nuclide = RADIONUCLIDES["Lu-177"]
    lam_s = nuclide.decay_constant_per_s
    inj, sources["injection_datetime"] = _spect_injection(rec, sheet)
    seq = getattr(ds, "RadiopharmaceuticalInformationSequence", None)
    header_dose = seq[0].get("RadionuclideTotalDose") if seq else None
    header_bq: float | None = None
    if header_dose not in (None, ""):
        try:
            header_bq, dose_note = total_dose_bq(float(header_dose))
        except ValueError as exc:
            if row is None or row.injected_activity_mbq is None:
                raise IngestError(f"{where}: RadionuclideTotalDose {exc}") from exc
            dose_note = f"header RadionuclideTotalDose {header_dose!r} unusable ({exc})"
        if dose_note:
            notes.append(dose_note)
    if row is not None and row.injected_activity_mbq is not None:
        injected_bq = row.injected_activity_mbq * 1e6
        sources["injected_activity"] = "sheet"
        if header_bq is not None and abs(header_bq - injected_bq) > 0.01 * injected_bq:
            notes.append(f"injected activity {row.injected_activity_mbq:g} MBq from the SPECT sheet; the header says "
                         f"{header_bq / 1e6:g} MBq")
    elif header_bq is not None:
        injected_bq = header_bq
        sources["injected_activity"] = "header: RadionuclideTotalDose"
    else:
        raise IngestError(f"{where}: RadionuclideTotalDose missing (give injected_activity_mbq in the patient's SPECT "
                          f"sheet)")
    try:
        check_range(injected_bq / 1e6, cfg.plausibility.spect_activity_mbq,
                    "injected_activity_mbq of the SPECT sheet" if sources["injected_activity"] == "sheet"
                    else "RadionuclideTotalDose (0018,1074)", "MBq", where)
    except ImplausibleValue as exc:
        raise IngestError(str(exc)) from None
    flags: list[Flag] = []
    if facts.get("hours_pi") is not None:
        flags += flag_range(float(facts["hours_pi"]), cfg.plausibility.spect_hours, "hours_after_injection", "h",
                            rec.session, f"{where}: injection ({sources['injection_datetime']}) to SeriesTime")
    ctx.flags.extend(flags)
    for f in flags:
        log.warning("%s", f.message)
    arr, grid, units_in, dc, duration = _spect_values(rec, row, cfg, notes, sources)
    acq = _series_datetime(ds)
    cal = None
    if units_in == "CNTS":
        if row is not None and row.camera_cps_per_mbq is not None:
            cal, sources["calibration"] = row.camera_cps_per_mbq, "SPECT sheet"
        elif sheet.camera_cps_per_mbq is not None:
            cal, sources["calibration"] = sheet.camera_cps_per_mbq, "patient sheet"
        elif cfg.camera_cps_per_mbq is not None:
            cal, sources["calibration"] = float(cfg.camera_cps_per_mbq), "config: ingest.camera_cps_per_mbq"
        else:
            raise IngestError(f"{where}: SPECT in counts but no camera calibration factor (camera_cps_per_mbq in the "
                              f"patient sheet or the config)")
        if duration is None:
            raise IngestError(f"{where}: acquisition duration unknown (RotationInformationSequence ActualFrameDuration "
                              f"× NumberOfFramesInRotation, ActualFrameDuration, ImageComments $ImagingDuration$ all "
                              f"missing; give acquisition_duration_s in the patient's SPECT sheet)")
    try:
        arr, conv_notes = to_bqml_at_start(
            arr, units_in, dc, voxel_ml=grid.voxel_volume_ml, decay_constant_per_s=lam_s, calibration_cps_per_mbq=cal,
            duration_s=duration, seconds_injection_to_start=(acq - inj).total_seconds() if acq and inj else None)
    except NMValueError as exc:
        raise IngestError(f"{where}: {exc}") from exc
    notes.extend(conv_notes)
    # physical bound: no more activity in the field of view than was administered, decayed to the scan
    fov_mbq = float(arr.sum()) * grid.voxel_volume_ml / 1e6
    hours = facts.get("hours_pi")
    bounds = check_activity(fov_mbq, injected_bq / 1e6, float(hours) if hours is not None else math.nan,
                            lam_s * 3600.0, cfg.activity_tolerance, stage="ingest", region="field_of_view",
                            where=rec.session, source=where)
    ctx.bounds.extend(bounds)
    for v in bounds:
        log.warning("%s", v.message)
    rel = Path(rec.session) / "spect.nii.gz"
    side = {"modality": rec.modality, "units": "Bq/mL", "quantity": "activity concentration at acquisition start",
            "units_in_header": units_in, "radionuclide": "Lu-177",
            "half_life_s": nuclide.half_life_s, "injected_activity_bq": injected_bq,
            "injection_datetime": inj.isoformat() if inj else None,
            "acquisition_datetime": _iso(acq), "acquisition_duration_s": duration,
            "decay_correction": "NONE", "decay_correction_in_header": dc,
            "field_of_view_activity_mbq": fov_mbq, "value_sources": sources,
            "physical_bounds": [v.as_dict() for v in bounds], "plausibility": [f.as_dict() for f in flags],
            "cycle": facts.get("cycle"), "hours_pi": facts.get("hours_pi"),
            "source_series_instance_uid": rec.uid, "study_instance_uid": rec.study_uid,
            "frame_of_reference_uid": rec.frame_uid, "scanner": _scanner(ds), "notes": notes,
            "prrtquant_version": __version__}
    _write_image(_image(arr, grid), ctx.out / rel, side)
    ctx.grids[rec.uid] = grid
    ctx.add(**_base_row(rec, facts), role="spect", units="Bq/mL", path=str(rel),
            note="; ".join([v.message for v in bounds] + [f.message for f in flags]))


def _referenced_series_rtstruct(ds: pydicom.Dataset) -> str | None:
    for fr in getattr(ds, "ReferencedFrameOfReferenceSequence", []):
        for st in getattr(fr, "RTReferencedStudySequence", []):
            for se in getattr(st, "RTReferencedSeriesSequence", []):
                return str(se.SeriesInstanceUID)
    return None


def _referenced_series_seg(ds: pydicom.Dataset) -> str | None:
    for se in getattr(ds, "ReferencedSeriesSequence", []):
        return str(se.SeriesInstanceUID)
    return None


def _write_masks(ctx: _Ctx, rec: SeriesRecord, ref: SeriesRecord, masks: list[tuple[str, np.ndarray]],
                 source: str) -> dict[str, dict[str, Any]]:
    """Write masks on their image's grid and add inventory rows; returns source ROI name → its row."""
    grid = ctx.grids[ref.uid]
    written: dict[str, dict[str, Any]] = {}
    used: set[str] = set()
    for name, mask in masks:
        canonical = ctx.mapper.canonical(name)
        stem = canonical if canonical else f"unmapped_{_safe(name)}"
        while stem in used:
            stem += "_dup"
        used.add(stem)
        rel = Path(ref.session) / "masks" / source / f"{stem}.nii.gz"
        fractional = mask.dtype != bool
        img = _image(mask, grid, np.float32 if fractional else np.uint8)
        side = {"roi": canonical, "source_roi_name": name, "mask_source": source,
                "kind": "fractional" if fractional else "binary", "voxels": int(np.count_nonzero(mask)),
                "volume_ml": float(np.sum(mask) * grid.voxel_volume_ml),
                "source_series_instance_uid": rec.uid, "image_series_instance_uid": ref.uid,
                "prrtquant_version": __version__}
        if not np.any(mask):
            raise IngestError(f"{rec.paths[0]} (series {rec.uid}): ROI '{name}' is empty on its image (outside it?)")
        _write_image(img, ctx.out / rel, side)
        row = _base_row(ref, {})
        row.update(series_instance_uid=rec.uid, modality=rec.modality)
        ctx.add(**row, role="mask" if canonical else "unmapped_mask", roi=canonical or "", source_roi_name=name,
                mask_source=source, units="fraction" if fractional else "binary", path=str(rel),
                note="" if canonical else "ROI name not mapped to a canonical name; see roi_map in the config")
        written[name] = ctx.rows[-1]
    return written


def _write_fine_masks(ctx: _Ctx, ds: pydicom.Dataset, rec: SeriesRecord, ref: SeriesRecord,
                      rows: dict[str, dict[str, Any]]) -> None:
    """RTSTRUCT contours as signed distance maps, and rasterised on an in-plane-refined grid.

    Contours carry their shape at sub-voxel precision; a mask on a coarse CT grid (e.g. 5 mm voxels) loses
    it, and with it up to several % of a small lesion's mean uptake on another grid. Both are written on
    the image's slices with pixels refined to <= FINE_MASK_MM: the signed distance to the contours
    (``masks/rtstruct_distance``, inventory ``distance_path``: the surface registration carries, without a
    voxel staircase; see :func:`prrtquant.masks.contour_distance_maps`) and, for coarse images, the
    voxel-centre mask on that grid (``masks/rtstruct_fine``, ``fine_path``), cropped to each ROI.
    """
    grid = ctx.grids[ref.uid]
    factor = int(np.ceil(max(grid.spacing[0], grid.spacing[1]) / FINE_MASK_MM - 1e-6))
    fine = grid.refined((factor, factor, 1)) if factor > 1 else grid
    try:
        distances = contour_distance_maps(ds, fine, source=f"{rec.paths[0]}", max_slice_mm=CONTOUR_SLICE_MM,
                                          volume_preserving=True)
    except MaskError as exc:
        raise IngestError(str(exc)) from exc
    masks = rasterize_rtstruct(ds, fine, source=f"{rec.paths[0]}") if factor > 1 else {}
    for name, row in rows.items():
        side = {"roi": row["roi"], "source_roi_name": name, "mask_source": "rtstruct",
                "in_plane_refinement": factor, "source_series_instance_uid": rec.uid,
                "image_series_instance_uid": ref.uid, "prrtquant_version": __version__}
        if name in distances:
            phi, sub = distances[name]
            rel = Path(row["path"].replace("/masks/rtstruct/", "/masks/rtstruct_distance/"))
            _write_image(_image(phi, sub, np.float32), ctx.out / rel,
                         {**side, "kind": "signed_distance", "units": "mm",
                          "convention": "negative inside; in-plane distance to the contours on each contoured "
                                        "slice, linear between slices, closing half a slice beyond the end "
                                        "contours"})
            row["distance_path"] = str(rel)
        mask = masks.get(name)
        if mask is None or not mask.any():
            continue
        idx = np.argwhere(mask)
        margin = np.array([1, 2 * factor, 2 * factor])
        lo = np.maximum(idx.min(axis=0) - margin, 0)
        hi = np.minimum(idx.max(axis=0) + margin + 1, mask.shape)
        crop = mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        origin = fine.index_to_physical(lo[::-1][None, :].astype(float))[0]
        sub = Grid(size=tuple(int(v) for v in crop.shape[::-1]), spacing=fine.spacing,  # type: ignore[arg-type]
                   origin=tuple(float(v) for v in origin), direction=fine.direction)  # type: ignore[arg-type]
        rel = Path(row["path"].replace("/masks/rtstruct/", "/masks/rtstruct_fine/"))
        _write_image(_image(crop, sub, np.uint8), ctx.out / rel,
                     {**side, "kind": "binary", "voxels": int(crop.sum()),
                      "volume_ml": float(crop.sum() * sub.voxel_volume_ml)})
        row["fine_path"] = str(rel)


def _ingest_rtstruct(ctx: _Ctx, rec: SeriesRecord, series: dict[str, SeriesRecord]) -> None:
    try:
        ds = pydicom.dcmread(rec.paths[0])
    except Exception as exc:  # noqa: BLE001
        raise IngestError(f"{rec.paths[0]} (RTSTRUCT series {rec.uid}): unreadable or truncated ({exc})") from exc
    ref_uid = _referenced_series_rtstruct(ds)
    ref = series.get(ref_uid or "")
    if ref is None or ref.uid not in ctx.grids:
        raise IngestError(f"{rec.paths[0]} (RTSTRUCT series {rec.uid}): the image it was drawn on (series "
                          f"{ref_uid}) is not in the export")
    try:
        masks = rasterize_rtstruct(ds, ctx.grids[ref.uid], source=f"{rec.paths[0]}")
    except MaskError as exc:
        raise IngestError(str(exc)) from exc
    names = [r.name for r in rtstruct_rois(ds)]
    rows = _write_masks(ctx, rec, ref, [(n, masks[n]) for n in names if n in masks], "rtstruct")
    _write_fine_masks(ctx, ds, rec, ref, rows)
    for n in names:
        if n not in masks:
            ctx.add(**_base_row(ref, {}), role="empty_roi", source_roi_name=n, mask_source="rtstruct",
                    note="ROI without contours")


def _ingest_seg(ctx: _Ctx, rec: SeriesRecord, series: dict[str, SeriesRecord]) -> None:
    from .seg import SegError, read_seg

    ref_uid = _referenced_series_seg(rec.header)
    ref = series.get(ref_uid or "")
    if ref is None or ref.uid not in ctx.grids:
        raise IngestError(f"{rec.paths[0]} (SEG series {rec.uid}): the image it was drawn on (series {ref_uid}) is "
                          f"not in the export")
    try:
        segs = read_seg(rec.paths[0], ctx.grids[ref.uid])
    except SegError as exc:
        raise IngestError(str(exc)) from exc
    _write_masks(ctx, rec, ref, [(s.label, s.mask) for s in segs], "seg")


def _ingest_nifti(ctx: _Ctx, path: Path, series: dict[str, SeriesRecord]) -> None:
    """A NIfTI mask or label map (with ``<stem>.tsv``: columns value, name) on one ingested image's grid."""
    img = sitk.ReadImage(str(path))
    g = Grid.of(img)
    match = None
    for uid, grid in ctx.grids.items():
        if grid.size == g.size and np.allclose(grid.spacing, g.spacing, atol=1e-3) and \
                np.allclose(grid.origin, g.origin, atol=1e-2) and np.allclose(grid.direction, g.direction, atol=1e-4):
            match = series[uid]
            break
    if match is None:
        raise IngestError(f"{path}: NIfTI mask whose grid matches no image of the export (mask outside its image?)")
    arr = sitk.GetArrayFromImage(img)
    stem = path.name[:-7] if path.name.endswith(".nii.gz") else path.stem
    table = path.with_name(stem + ".tsv")
    masks: list[tuple[str, np.ndarray]] = []
    if table.exists():
        lut = pd.read_csv(table, sep="\t", dtype={"value": int, "name": str})
        for v, name in zip(lut["value"], lut["name"]):
            masks.append((str(name), arr == int(v)))
    else:
        masks.append((stem, arr > 0))
    fake = SeriesRecord(uid="", modality="NIFTI", sop_class="", study_uid=match.study_uid, frame_uid=match.frame_uid,
                        header=pydicom.Dataset(), paths=[path])
    _write_masks(ctx, fake, match, masks, "nifti")


# ----------------------------------------------------------------------------- entry point

def ingest(dicom_dir: str | Path, out_dir: str | Path, sheet: PatientSheet, config: IngestConfig | None = None) -> pd.DataFrame:
    """Ingest one patient's export; returns the inventory (also written to ``out_dir/inventory.tsv``)."""
    cfg = config or IngestConfig()
    root, out = Path(dicom_dir), Path(out_dir)
    if not root.is_dir():
        raise IngestError(f"{root}: not a directory")
    if out.exists() and not out.is_dir():
        raise IngestError(f"{out}: exists and is not a folder; refusing to replace it")
    if out.exists() and any(out.iterdir()) and not (out / "inventory.tsv").exists():
        raise IngestError(f"{out}: exists, is not empty and is not an ingest output; refusing to replace it")
    series, nifti, other = scan(root)
    if not series:
        raise IngestError(f"{root}: no DICOM files found")
    classify(series)
    session_flags: list[Flag] = []
    facts = label_sessions(series, sheet, cfg, session_flags)
    with atomic_directory(out) as tmp:
        ctx = _Ctx(out=tmp, rows=[], grids={}, mapper=RoiMapper(cfg.roi_map), flags=session_flags)
        for f in session_flags:
            log.warning("%s", f.message)
        order = sorted(series.values(), key=lambda r: (r.session, r.kind, r.uid))
        for rec in order:
            f = facts.get(rec.session, {})
            if rec.kind in ("ct", "mr"):
                _ingest_ct_mr(ctx, rec, f)
            elif rec.kind == "pet":
                _ingest_pet(ctx, rec, f, sheet, cfg)
            elif rec.kind in ("spect_nm", "spect_pt"):
                _ingest_spect(ctx, rec, f, sheet, cfg)
        for rec in order:
            if rec.kind == "rtstruct":
                _ingest_rtstruct(ctx, rec, series)
            elif rec.kind == "seg":
                _ingest_seg(ctx, rec, series)
            elif rec.kind == "ignored":
                ctx.add(series_instance_uid=rec.uid, modality=rec.modality, role="ignored",
                        study_instance_uid=rec.study_uid, note=rec.note)
        for p in nifti:
            _ingest_nifti(ctx, p, series)
        if cfg.fail_on_bounds:
            raise_if_any(ctx.bounds, f"{root}")
        inv = pd.DataFrame(ctx.rows, columns=INVENTORY_COLUMNS)
        inv.to_csv(tmp / "inventory.tsv", sep="\t", index=False)
        (tmp / "sessions.json").write_text(json.dumps({"patient": sheet.patient, "design": sheet.design,
                                                        "treated_lobe": sheet.treated_lobe, "sessions": facts,
                                                        "ignored_files": len(other),
                                                        "physical_bounds": [v.as_dict() for v in ctx.bounds],
                                                        "plausibility": [f.as_dict() for f in ctx.flags]},
                                                       indent=1, default=str))
    log.info("%s: %d sessions, %d files written, %d non-DICOM files ignored", sheet.patient, len(facts),
             int((inv["path"] != "").sum()), len(other))
    return inv
