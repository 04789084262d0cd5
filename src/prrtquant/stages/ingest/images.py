"""Images of an export as NIfTI in physical units with provenance sidecars: CT and MR, PET (Bq/mL, SUV), SPECT (Bq/mL)."""

from __future__ import annotations

import gzip
import logging
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import SimpleITK as sitk

from ... import __version__
from ...bounds import Violation, check_activity
from ...dicom.radiopharmaceutical import total_dose_bq
from ...dicom.series import SeriesError, load_sliced_series, rescaled_volume
from ...dicom.spect import NMGeometryError, NMValueError, acquisition_duration_s, read_nm, to_bqml_at_start
from ...errors import IngestError
from ...geometry import Grid
from ...io import sha256_of, sidecar_of, write_json
from ...plausibility import Flag, ImplausibleValue, PlausibilitySettings, check_range, flag_range
from ...radionuclides import RADIONUCLIDES
from ...roi_names import RoiMapper
from .. import layout
from .inputs import IngestConfig, PatientSheet, SpectSheetRow
from .sessions import SeriesRecord, _iso, _series_datetime, _spect_injection

log = logging.getLogger(__name__)

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
    write_json(sidecar_of(path), sidecar)


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
        row = {c: "" for c in layout.INVENTORY.columns}
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
    from ...dicom.pet import SuvError, convert_pet_series

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


def _spect_injected_bq(ds: pydicom.Dataset, row: SpectSheetRow | None, where: str, notes: list[str],
                       sources: dict[str, str]) -> float:
    """Injected activity (Bq) of a SPECT: the SPECT sheet's when it gives one, else RadionuclideTotalDose."""
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
        return injected_bq
    if header_bq is not None:
        sources["injected_activity"] = "header: RadionuclideTotalDose"
        return header_bq
    raise IngestError(f"{where}: RadionuclideTotalDose missing (give injected_activity_mbq in the patient's SPECT "
                      f"sheet)")


def _spect_calibration(row: SpectSheetRow | None, sheet: PatientSheet, cfg: IngestConfig, where: str,
                       sources: dict[str, str]) -> float:
    """Camera calibration (cps/MBq) of a SPECT in counts: SPECT sheet, else patient sheet, else config."""
    if row is not None and row.camera_cps_per_mbq is not None:
        sources["calibration"] = "SPECT sheet"
        return row.camera_cps_per_mbq
    if sheet.camera_cps_per_mbq is not None:
        sources["calibration"] = "patient sheet"
        return sheet.camera_cps_per_mbq
    if cfg.camera_cps_per_mbq is not None:
        sources["calibration"] = "config: ingest.camera_cps_per_mbq"
        return float(cfg.camera_cps_per_mbq)
    raise IngestError(f"{where}: SPECT in counts but no camera calibration factor (camera_cps_per_mbq in the "
                      f"patient sheet or the config)")


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
    injected_bq = _spect_injected_bq(ds, row, where, notes, sources)
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
    cal = _spect_calibration(row, sheet, cfg, where, sources) if units_in == "CNTS" else None
    if units_in == "CNTS" and duration is None:
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


