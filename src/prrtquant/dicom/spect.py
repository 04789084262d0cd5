"""NM Image Storage multi-frame reconstructions (SPECT) as SimpleITK images in physical space and units.

Geometry
--------
A RECON TOMO NM object keeps its geometry in the Detector Information Sequence (first frame's
ImagePositionPatient and the ImageOrientationPatient); frame k lies at
``IPP + k * SpacingBetweenSlices * (row × column)``. A negative SpacingBetweenSlices means the
frames run against the slice normal: the volume is reordered so that the returned image has a
positive z spacing and its direction is right-handed (see shared PITFALLS).

Values (docs/nm_values.md has the standard's text and what each vendor writes)
----------------------------------------------------------------------------
Per frame, from the *stored* value SV:

1. **Real World Value Mapping** (0040,9096) — per-frame functional group, shared functional group, or
   top level — whose MeasurementUnitsCodeSequence is Bq/mL (UCUM ``Bq/ml``; also kBq/mL, MBq/mL):
   ``Bq/mL = RWVSlope·SV + RWVIntercept``. The standard makes this mapping independent of the Modality
   LUT, so it is applied to stored values, never after RescaleSlope. A mapping in ``{counts}`` gives
   counts the same way. Items in other units (SUV, ...) are ignored, with a note.
2. Otherwise the **Modality LUT** — RescaleSlope/RescaleIntercept per frame (Pixel Value
   Transformation Sequence of the functional groups) or at top level — with **Units (0054,1001)**
   (a vendor extension in NM objects): ``BQML`` → Bq/mL, ``CNTS`` or no Units → counts (the NM
   image's own quantity; pydicom's convention of applying the rescale is followed, noted).
3. Both a Bq/mL mapping and Units BQML: the two must agree (relative 1e-4 over the stored range),
   else the file is refused; never are both applied. A Bq/mL statement wins over a counts one (a
   ``{counts}`` mapping beside Units BQML, or Units CNTS beside a Bq/mL mapping), with a note.

Refused with the file and tags named: a Real World Value Mapping by LUT data, stored values outside
the mapping's First/Last Value Mapped, two Bq/mL mappings that disagree, Units other than BQML/CNTS, a non-finite or non-positive slope.

Decay correction: CorrectedImage (0028,0051) ``DECY`` says the values are decay corrected, but NM has
no DecayCorrection (0054,1102) to say to when. When the file carries DecayCorrection (START or
ADMIN) it is used (it must agree with DECY); otherwise the reference must be given
(``decay_reference``), else the file is refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk

from ..errors import NMGeometryError, NMValueError
from .values import number, text

Array = np.ndarray

__all__ = ["NMGeometryError", "NMValueError", "NMValues", "read_nm", "imaging_duration_from_comments",
           "acquisition_duration_s", "decay_factor_during_acquisition"]

#: unit code (lower case, from MeasurementUnitsCodeSequence CodeValue) → (quantity, factor to Bq/mL or counts)
_RWV_UNITS = {"bq/ml": ("BQML", 1.0), "bq/cm3": ("BQML", 1.0), "kbq/ml": ("BQML", 1e3), "mbq/ml": ("BQML", 1e6),
              "{counts}": ("CNTS", 1.0), "counts": ("CNTS", 1.0), "cnts": ("CNTS", 1.0), "{cnts}": ("CNTS", 1.0),
              "{counts}/{voxel}": ("CNTS", 1.0)}
_AGREE_RTOL = 1e-4


@dataclass(frozen=True)
class NMValues:
    """One NM reconstruction in physical space."""

    image: sitk.Image                 #: float64, values in ``units``
    units: str                        #: "BQML" (Bq/mL) or "CNTS" (counts per voxel)
    mapping: str                      #: which DICOM mapping gave the values (for the sidecar)
    decay_correction: str             #: "NONE", "START" (acquisition start) or "ADMIN" (administration)
    decay_correction_source: str      #: "header: DecayCorrection", "header: CorrectedImage", "setting", "none"
    slopes: tuple[float, ...]         #: slope used per frame (stored order)
    intercepts: tuple[float, ...]     #: intercept used per frame
    notes: tuple[str, ...] = field(default_factory=tuple)


def _geometry_source(ds: pydicom.Dataset) -> pydicom.Dataset:
    det = getattr(ds, "DetectorInformationSequence", None)
    if det and "ImagePositionPatient" in det[0] and "ImageOrientationPatient" in det[0]:
        return det[0]
    if "ImagePositionPatient" in ds and "ImageOrientationPatient" in ds:
        return ds
    raise NMGeometryError("no ImagePositionPatient/ImageOrientationPatient in the Detector Information "
                          "Sequence or at top level")


def _item(ds: pydicom.Dataset | None, keyword: str) -> pydicom.Dataset | None:
    seq = getattr(ds, keyword, None) if ds is not None else None
    return seq[0] if seq else None


def _frame_groups(ds: pydicom.Dataset, n: int) -> tuple[list[pydicom.Dataset | None], pydicom.Dataset | None]:
    per = list(getattr(ds, "PerFrameFunctionalGroupsSequence", []) or [])
    if per and len(per) != n:
        raise NMValueError(f"PerFrameFunctionalGroupsSequence has {len(per)} items for {n} frames")
    return (per if per else [None] * n), _item(ds, "SharedFunctionalGroupsSequence")


def _rescale(ds: pydicom.Dataset, per: list[pydicom.Dataset | None], shared: pydicom.Dataset | None
             ) -> tuple[list[float], list[float], str]:
    """Slope and intercept per frame: Pixel Value Transformation per frame, shared, then top level."""
    slopes, intercepts, where = [], [], "none (slope 1, intercept 0)"
    for fg in per:
        pvt = _item(fg, "PixelValueTransformationSequence") or _item(shared, "PixelValueTransformationSequence")
        src = pvt if pvt is not None and "RescaleSlope" in pvt else (ds if "RescaleSlope" in ds else None)
        if src is not None:
            where = ("functional groups: PixelValueTransformationSequence" if src is not ds
                     else "RescaleSlope/RescaleIntercept")
        try:
            m = number(getattr(src, "RescaleSlope", None)) if src is not None else None
            b = number(getattr(src, "RescaleIntercept", None)) if src is not None else None
        except ValueError as exc:
            raise NMValueError(f"RescaleSlope/RescaleIntercept unreadable ({exc})") from exc
        m = 1.0 if m is None else m
        b = 0.0 if b is None else b
        if not (math.isfinite(m) and math.isfinite(b)) or m <= 0:
            raise NMValueError(f"RescaleSlope {m!r} / RescaleIntercept {b!r}: slope must be finite and > 0, "
                               f"intercept finite")
        slopes.append(m)
        intercepts.append(b)
    return slopes, intercepts, where


def _unit_of(item: pydicom.Dataset) -> tuple[str | None, float, str]:
    """(quantity, factor, code text) of one Real World Value Mapping item."""
    code = _item(item, "MeasurementUnitsCodeSequence")
    value = (text(getattr(code, "CodeValue", None)) or "") if code is not None else ""
    meaning = (text(getattr(code, "CodeMeaning", None)) or "") if code is not None else ""
    label = text(getattr(item, "LUTLabel", None)) or ""
    key = value.strip().lower()
    if key in _RWV_UNITS:
        q, f = _RWV_UNITS[key]
        return q, f, value
    if not value and "becquerel" in meaning.lower() and "mil" in meaning.lower():
        return "BQML", 1.0, meaning
    return None, 1.0, value or meaning or label or "no unit code"


def _rwv(ds: pydicom.Dataset, per: list[pydicom.Dataset | None], shared: pydicom.Dataset | None,
         stored: Array, notes: list[str]) -> tuple[str, list[float], list[float], str] | None:
    """The Real World Value Mapping in physical units, per frame; None when there is none."""
    chosen: list[tuple[str, float, float, str]] = []
    ignored: set[str] = set()
    for k, fg in enumerate(per):
        items = (list(getattr(fg, "RealWorldValueMappingSequence", []) or []) if fg is not None else []) or (
            list(getattr(shared, "RealWorldValueMappingSequence", []) or []) if shared is not None else []) or list(
            getattr(ds, "RealWorldValueMappingSequence", []) or [])
        found: list[tuple[str, float, float, str]] = []
        for it in items:
            q, factor, code = _unit_of(it)
            if q is None:
                ignored.add(code)
                continue
            if "RealWorldValueSlope" not in it:
                raise NMValueError(f"Real World Value Mapping in {code!r} given as LUT data (RealWorldValueLUTData), "
                                   f"which prrtquant does not read")
            try:
                m = number(it.RealWorldValueSlope)
                b = number(getattr(it, "RealWorldValueIntercept", 0.0)) or 0.0
                lo = number(getattr(it, "RealWorldValueFirstValueMapped", None))
                hi = number(getattr(it, "RealWorldValueLastValueMapped", None))
            except ValueError as exc:
                raise NMValueError(f"Real World Value Mapping unreadable ({exc})") from exc
            if m is None or not (math.isfinite(m) and math.isfinite(b)) or m <= 0:
                raise NMValueError(f"RealWorldValueSlope {m!r} / Intercept {b!r}: slope must be finite and > 0")
            frame = stored[k]
            if lo is not None and hi is not None and frame.size and (frame.min() < lo or frame.max() > hi):
                raise NMValueError(f"frame {k + 1}: stored values {frame.min():g}..{frame.max():g} outside the Real "
                                   f"World Value Mapping's First/Last Value Mapped {lo:g}..{hi:g} (no real value "
                                   f"attached)")
            found.append((q, m * factor, b * factor, code))
        kinds = {f[0] for f in found}
        if len(kinds) > 1:
            found = [f for f in found if f[0] == "BQML"]  # Bq/mL and counts mappings side by side: Bq/mL
        if len({(f[1], f[2]) for f in found}) > 1:
            raise NMValueError(f"frame {k + 1}: {len(found)} Real World Value Mappings in {found[0][0]} with "
                               f"different slopes/intercepts {[(f[1], f[2]) for f in found]}")
        if found:
            chosen.append(found[0])
        elif chosen:
            raise NMValueError(f"frame {k + 1} has no Real World Value Mapping in physical units, others do")
    for code in sorted(ignored):
        notes.append(f"Real World Value Mapping in {code!r} ignored (not an activity or count unit)")
    if not chosen:
        return None
    if len({c[0] for c in chosen}) > 1:
        raise NMValueError("Real World Value Mappings of different frames map to different units")
    return chosen[0][0], [c[1] for c in chosen], [c[2] for c in chosen], chosen[0][3]


def _decay(ds: pydicom.Dataset, decay_reference: str | None, notes: list[str]) -> tuple[str, str]:
    corrected = [str(v).upper() for v in (getattr(ds, "CorrectedImage", None) or [])]
    if isinstance(getattr(ds, "CorrectedImage", None), str):
        corrected = [str(ds.CorrectedImage).upper()]
    decy = "DECY" in corrected
    dc = (text(getattr(ds, "DecayCorrection", None)) or "").upper()
    if dc:
        if dc not in ("NONE", "START", "ADMIN"):
            raise NMValueError(f"DecayCorrection {dc!r} not understood (NONE, START, ADMIN)")
        if corrected and decy != (dc != "NONE"):
            raise NMValueError(f"DecayCorrection {dc} disagrees with CorrectedImage {corrected} "
                               f"({'DECY' if decy else 'no DECY'})")
        return dc, "header: DecayCorrection"
    if decy:
        if decay_reference in ("START", "ADMIN"):
            notes.append(f"CorrectedImage DECY without DecayCorrection: reference {decay_reference} from the settings")
            return decay_reference, "setting"
        raise NMValueError("CorrectedImage says DECY (decay corrected) but the NM object does not say to which time "
                           "(no DecayCorrection); state it with spect_decay_reference (START or ADMIN) in the "
                           "ingest config or the SPECT sheet")
    return "NONE", "header: CorrectedImage" if corrected else "none"


def read_nm(path: str | Path, decay_reference: str | None = None) -> NMValues:
    """Read one multi-frame NM reconstruction; values in Bq/mL or counts as the module docstring says.

    ``decay_reference``: START or ADMIN, used only when CorrectedImage has DECY and the file does not
    say to which time its values are decay corrected.
    """
    path = Path(path)
    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:  # noqa: BLE001 - any parse failure of a file named as NM
        raise NMValueError(f"{path}: unreadable DICOM ({exc})") from exc
    try:
        geo = _geometry_source(ds)
    except NMGeometryError as exc:
        raise NMGeometryError(f"{path}: {exc}") from exc
    if "SpacingBetweenSlices" not in ds and "SliceThickness" not in ds:
        raise NMGeometryError(f"{path}: neither SpacingBetweenSlices nor SliceThickness present")
    sbs = float(ds.SpacingBetweenSlices) if "SpacingBetweenSlices" in ds else float(ds.SliceThickness)
    if sbs == 0:
        raise NMGeometryError(f"{path}: SpacingBetweenSlices is 0")
    iop = np.asarray(geo.ImageOrientationPatient, dtype=float)
    row, col = iop[:3], iop[3:]
    normal = np.cross(row, col)
    ipp = np.asarray(geo.ImagePositionPatient, dtype=float)
    stored = np.asarray(ds.pixel_array, dtype=np.float64)
    if stored.ndim == 2:
        stored = stored[None]
    n = stored.shape[0]
    notes: list[str] = []
    try:
        per, shared = _frame_groups(ds, n)
        slopes, intercepts, where = _rescale(ds, per, shared)
        rwv = _rwv(ds, per, shared, stored, notes)
        units_tag = (text(getattr(ds, "Units", None)) or "").upper()
        if units_tag not in ("", "BQML", "CNTS"):
            raise NMValueError(f"Units (0054,1001) {units_tag!r} not understood (BQML or CNTS)")
        m = np.asarray(slopes)[:, None, None]
        b = np.asarray(intercepts)[:, None, None]
        if rwv is not None and rwv[0] == "CNTS" and units_tag == "BQML":
            notes.append(f"Real World Value Mapping in {rwv[3]!r} not used: Units BQML with the rescale gives Bq/mL")
            rwv = None
        if rwv is not None:
            units, rs, ri, code = rwv
            values = stored * np.asarray(rs)[:, None, None] + np.asarray(ri)[:, None, None]
            if units_tag == "BQML":
                modality = stored * m + b
                scale = max(float(np.abs(values).max()), 1e-12)
                if float(np.abs(modality - values).max()) > _AGREE_RTOL * scale:
                    raise NMValueError(f"Real World Value Mapping (slope {rs[0]:.6g}, intercept {ri[0]:.6g}) and "
                                       f"Units BQML with RescaleSlope {slopes[0]:.6g} / RescaleIntercept "
                                       f"{intercepts[0]:.6g} give different Bq/mL")
            elif units_tag == "CNTS" and units == "BQML":
                notes.append("Units CNTS describes the rescaled counts; the Real World Value Mapping gives Bq/mL")
            mapping = f"RealWorldValueMapping ({code}) on stored values"
            slopes, intercepts = list(rs), list(ri)
            if where != "none (slope 1, intercept 0)":
                notes.append(f"{where} not applied: the Real World Value Mapping maps stored values itself")
        else:
            values = stored * m + b
            units = "BQML" if units_tag == "BQML" else "CNTS"
            mapping = f"{where}, Units {units_tag or 'absent'}"
            if not units_tag:
                notes.append("no Units and no Real World Value Mapping: stored × RescaleSlope + RescaleIntercept "
                             "taken as counts (the NM image's own quantity)")
        if not np.isfinite(values).all():
            raise NMValueError("non-finite values after rescaling")
        dc, dc_src = _decay(ds, decay_reference, notes)
    except NMValueError as exc:
        raise NMValueError(f"{path}: {exc}") from exc
    if sbs < 0:
        values = values[::-1]
        ipp = ipp + (n - 1) * sbs * normal
        sbs = -sbs
    ps = [float(v) for v in ds.PixelSpacing]  # row spacing, column spacing
    img = sitk.GetImageFromArray(np.ascontiguousarray(values))
    img.SetSpacing([ps[1], ps[0], sbs])
    img.SetOrigin([float(v) for v in ipp])
    img.SetDirection([float(v) for v in np.stack([row, col, normal], axis=1).ravel()])
    return NMValues(image=img, units=units, mapping=mapping, decay_correction=dc, decay_correction_source=dc_src,
                    slopes=tuple(float(v) for v in slopes), intercepts=tuple(float(v) for v in intercepts),
                    notes=tuple(notes))


def imaging_duration_from_comments(ds: pydicom.Dataset) -> float | None:
    """GE StarGuide keeps the acquisition time only in ImageComments: ``$ImagingDuration$<ms>$`` → seconds.

    >>> d = pydicom.Dataset(); d.ImageComments = "x$ImagingDuration$1200000$y"
    >>> imaging_duration_from_comments(d)
    1200.0
    """
    import re

    m = re.search(r"\$ImagingDuration\$(\d+(?:\.\d+)?)\$", str(getattr(ds, "ImageComments", "") or ""))
    return float(m.group(1)) / 1000.0 if m else None


def acquisition_duration_s(ds: pydicom.Dataset) -> tuple[float, str] | None:
    """Acquisition duration (s) and the tags it came from; None when the header does not say.

    RotationInformationSequence: Σ ActualFrameDuration (ms) × NumberOfFramesInRotation (the time per
    detector head, which a system calibration in cps/MBq refers to); else a top-level
    ActualFrameDuration; else GE StarGuide's ImageComments.
    """
    rot = getattr(ds, "RotationInformationSequence", None)
    if rot and all("ActualFrameDuration" in r and "NumberOfFramesInRotation" in r for r in rot):
        total = sum(float(r.ActualFrameDuration) / 1000.0 * int(r.NumberOfFramesInRotation) for r in rot)
        if total > 0:
            return total, "header: RotationInformationSequence ActualFrameDuration × NumberOfFramesInRotation"
    if "ActualFrameDuration" in ds and float(ds.ActualFrameDuration) > 0:
        return float(ds.ActualFrameDuration) / 1000.0, "header: ActualFrameDuration"
    d = imaging_duration_from_comments(ds)
    if d is not None and d > 0:
        return d, "header: ImageComments $ImagingDuration$"
    return None


def decay_factor_during_acquisition(decay_constant_per_s: float, duration_s: float) -> float:
    """Mean of exp(−λt) over an acquisition of ``duration_s``: values not decay corrected are this times the
    value at acquisition start (divide by it to refer them to the start).

    >>> round(decay_factor_during_acquisition(math.log(2) / 574344.0, 1200.0), 6)
    0.999276
    """
    x = decay_constant_per_s * duration_s
    return 1.0 if x <= 0 else float(-math.expm1(-x) / x)


def to_bqml_at_start(values: Array, units: str, decay_correction: str, *, voxel_ml: float,
                     decay_constant_per_s: float, calibration_cps_per_mbq: float | None = None,
                     duration_s: float | None = None, seconds_injection_to_start: float | None = None
                     ) -> tuple[Array, list[str]]:
    """SPECT values (``units`` BQML or CNTS, decay reference NONE/START/ADMIN) → Bq/mL at acquisition start.

    * counts → Bq/mL: ``counts / (calibration [cps/MBq] × duration [s]) × 1e6 / voxel_ml``;
    * counts and values not decay corrected (NONE) are the mean over the acquisition: divided by
      :func:`decay_factor_during_acquisition` they refer to its start;
    * ADMIN (decay corrected to the administration): multiplied by ``exp(−λ·t)``, t from injection to start;
    * START: already at acquisition start.

    Raises :class:`NMValueError` naming what is missing (calibration, duration, injection time).

    >>> v, _ = to_bqml_at_start(np.array([1200.0]), "CNTS", "NONE", voxel_ml=1.0, decay_constant_per_s=0.0,
    ...                         calibration_cps_per_mbq=10.0, duration_s=120.0)
    >>> float(v[0])  # 1200 counts / (10 cps/MBq × 120 s) = 1 MBq in 1 mL
    1000000.0
    """
    notes: list[str] = []
    out = np.asarray(values, dtype=np.float64)
    if units == "CNTS":
        if calibration_cps_per_mbq is None or not calibration_cps_per_mbq > 0:
            raise NMValueError("SPECT in counts but no camera calibration factor (camera_cps_per_mbq)")
        if duration_s is None or not duration_s > 0:
            raise NMValueError("SPECT in counts but the acquisition duration is unknown")
        out = out / (calibration_cps_per_mbq * duration_s) * 1e6 / voxel_ml
        notes.append(f"counts → Bq/mL with {calibration_cps_per_mbq:g} cps/MBq, {duration_s:g} s, voxel "
                     f"{voxel_ml:.4f} mL")
    elif units != "BQML":
        raise NMValueError(f"units {units!r}: expected BQML or CNTS")
    if decay_correction == "ADMIN":
        if seconds_injection_to_start is None:
            raise NMValueError("decay corrected to administration but the injection or acquisition time is missing")
        out = out * math.exp(-decay_constant_per_s * seconds_injection_to_start)
        notes.append("decay correction to administration undone: values at acquisition start")
    elif decay_correction == "NONE" or units == "CNTS":
        if duration_s is not None and duration_s > 0:
            f = decay_factor_during_acquisition(decay_constant_per_s, duration_s)
            out = out / f
            notes.append(f"mean over the {duration_s:g} s acquisition referred to its start (÷ {f:.6f})")
        else:
            notes.append("not decay corrected and no acquisition duration: values taken as at acquisition start")
    elif decay_correction != "START":
        raise NMValueError(f"decay correction {decay_correction!r}: expected NONE, START or ADMIN")
    return out, notes
