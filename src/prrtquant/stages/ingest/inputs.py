"""What a site tells ingest besides the DICOM: the patient sheet, the SPECT sheet, the stage's settings."""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import pandas as pd

from ...bounds import DEFAULT_TOLERANCE, BoundsSettings
from ...errors import IngestError
from ...plausibility import PlausibilitySettings

__all__ = ["PatientSheet", "SpectSheetRow", "IngestConfig", "read_spect_sheet", "SPECT_SHEET_COLUMNS"]



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
        from ...config import validate_sheet_row

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


