"""Series of an export and their sessions: header index, classification, session labels (PET route, SPECT cycles and hours)."""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom

from ...dicom.index import MEDIA_STORAGE_DIRECTORY, walk_export
from ...dicom.radiopharmaceutical import (
    InjectionAfterScanError,
    injection_datetime,
    radionuclide_of,
    route_of,
)
from ...dicom.values import combine
from ...errors import IngestError
from ...plausibility import Flag, PlausibilitySettings
from .inputs import IngestConfig, PatientSheet

__all__ = ["SeriesRecord", "scan", "classify", "label_sessions"]

log = logging.getLogger(__name__)

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


def scan(root: Path) -> tuple[dict[str, SeriesRecord], list[Path], list[Path]]:
    """Header-only index: series, NIfTI files, other (ignored) files.

    A file without the DICOM preamble that looks like part of the export (:func:`prrtquant.dicom.index.walk_export`:
    ``.dcm``, or named like its DICOM neighbours, no suffix or a number) is refused, naming it: empty,
    unreadable, or DICOM without the Part 10 header: an unreadable slice is never silently left out of its
    series.
    """
    series: dict[str, SeriesRecord] = {}
    nifti: list[Path] = []
    other: list[Path] = []
    for found in walk_export(root):
        p, ds = found.path, found.header
        if found.kind == "nifti":
            nifti.append(p)
            continue
        if found.kind == "suspect":
            raise IngestError(found.problem)
        if found.kind == "other":
            other.append(p)
            continue
        if ds is None:
            raise IngestError(f"{p}: unreadable DICOM header ({found.problem})")
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
    """Radionuclide named by the first RadiopharmaceuticalInformationSequence item of ``ds``, or None."""
    seq = getattr(ds, "RadiopharmaceuticalInformationSequence", None)
    return radionuclide_of(seq[0]) if seq else None


def _parse_dt(date: str | None, time: str | None) -> dt.datetime | None:
    try:
        return combine(date, time)
    except ValueError:
        return None


def _injection(ds: pydicom.Dataset) -> dt.datetime | None:
    """Injection date-time from the header's RadiopharmaceuticalInformationSequence, by the shared rule
    (:func:`prrtquant.dicom.radiopharmaceutical.injection_datetime`, scan start the series date-time, no
    tolerance after it: a time-only injection later in the day than the scan was the day before).

    None when the sequence or the series date-time is missing, or the start time is missing or unreadable.
    An injection recorded after the scan is returned as recorded: :func:`label_sessions` refuses it,
    naming the file.
    """
    seq = getattr(ds, "RadiopharmaceuticalInformationSequence", None)
    scan = _series_datetime(ds)
    if not seq or scan is None:
        return None
    try:
        return injection_datetime(seq[0], scan, lambda _note: None, after_scan_tolerance=dt.timedelta(0))
    except InjectionAfterScanError as exc:
        return exc.injection
    except ValueError:
        return None


def _spect_injection(rec: SeriesRecord, sheet: PatientSheet) -> tuple[dt.datetime | None, str]:
    """Injection date-time of a SPECT series and where it came from: the SPECT sheet when it gives one
    (e.g. GE StarGuide exports carry no usable administration time), else the header."""
    row = sheet.spect.get(rec.uid)
    if row is not None and row.injection_datetime is not None:
        return row.injection_datetime, "sheet"
    return _injection(rec.header), "header: RadiopharmaceuticalInformationSequence"


def _series_datetime(ds: pydicom.Dataset) -> dt.datetime | None:
    """When a series was acquired, for ordering sessions and hours after injection: the first complete
    date + time pair of Series, Acquisition, Study (never a time of one with the date of another, which
    is a day off across midnight; the PET decay reference has its own, QIBA, rule:
    :func:`prrtquant.dicom.values.series_datetime`)."""
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


def _ia_pet_study(pet_studies: dict[str, list[SeriesRecord]], sheet: PatientSheet) -> str | None:
    """The PET study that followed the IA injection: the sheet's, else the one whose header route says IA."""
    if sheet.ia_pet_study_instance_uid:
        if sheet.ia_pet_study_instance_uid not in pet_studies:
            raise IngestError(f"patient sheet: ia_pet_study_instance_uid {sheet.ia_pet_study_instance_uid} is not a "
                              f"PET study of this export (PET studies: {sorted(pet_studies)})")
        ia_study = sheet.ia_pet_study_instance_uid
        routes = {s: route_of(r[0].header) for s, r in pet_studies.items()}
        if routes.get(ia_study) == "IV":
            log.warning("study %s: the sheet says IA, the header route says intravenous; the sheet wins", ia_study)
    else:
        candidates = [s for s, r in pet_studies.items() if route_of(r[0].header) == "IA"]
        if len(candidates) > 1:
            raise IngestError(f"two candidate IA PET studies ({', '.join(candidates)}) and no "
                              f"ia_pet_study_instance_uid in the patient sheet for {sheet.patient}")
        ia_study = candidates[0] if candidates else None
    return ia_study


def _label_pets(pet_studies: dict[str, list[SeriesRecord]], sheet: PatientSheet, facts: dict[str, dict[str, Any]],
                study_session: dict[str, str]) -> None:
    """Sessions ``pet_ia``, ``pet_iv`` (``pet_iv_2``, ... in time order) of the PET studies."""
    ia_study = _ia_pet_study(pet_studies, sheet)
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


def _spect_times(spect_studies: dict[str, list[SeriesRecord]], sheet: PatientSheet
                 ) -> dict[str, tuple[dt.datetime, dt.datetime]]:
    """(injection, acquisition) date-times of every SPECT study; refused when missing or out of order."""
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
    return spect_info


def _spect_cycles(spect_info: dict[str, tuple[dt.datetime, dt.datetime]],
                  spect_studies: dict[str, list[SeriesRecord]], rules: PlausibilitySettings,
                  flags: list[Flag]) -> dict[str, int]:
    """Cycle number of every SPECT study: administrations closer than ``min_cycle_interval_days`` are one cycle
    (single linkage in time, measured from the cycle's first administration)."""
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
    return cycle_of


def _label_spects(spect_info: dict[str, tuple[dt.datetime, dt.datetime]], cycle_of: dict[str, int],
                  spect_studies: dict[str, list[SeriesRecord]], cfg: IngestConfig,
                  facts: dict[str, dict[str, Any]], study_session: dict[str, str]) -> None:
    """Sessions ``spect_c{cycle}_{hours}h`` (nominal hours after injection) of the SPECT studies."""
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
                      "route": route_of(spect_studies[s][0].header), "radionuclide": "Lu-177",
                      "injection_datetime": inj.isoformat()}


def _label_others(by_study: dict[str, list[SeriesRecord]], facts: dict[str, dict[str, Any]],
                  study_session: dict[str, str]) -> None:
    """Sessions ``mr``, ``ct`` (``_2``, ... in time order) of the studies without PET or SPECT."""
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

    _label_pets(pet_studies, sheet, facts, study_session)
    spect_info = _spect_times(spect_studies, sheet)
    cycle_of = _spect_cycles(spect_info, spect_studies, cfg.plausibility, flags)
    _label_spects(spect_info, cycle_of, spect_studies, cfg, facts, study_session)
    _label_others(by_study, facts, study_session)
    for rec in series.values():
        if rec.kind in ("ct", "mr", "pet", "spect_nm", "spect_pt"):
            rec.session = study_session[rec.study_uid]
    return facts


