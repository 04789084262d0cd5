"""PET series to activity concentration (Bq/mL) and SUV, following QIBA and the IBSI SUV manual.

The rules implemented here are those of the "Comprehensive Manual for SUV Computation and Digital
Reference Objects for its Verification" (Vácha et al., oncoray/suv_computation,
https://oncoray.github.io/suv_computation/suv.html; its DROs are in tests/data/external/ibsi_suv_dro)
and the QIBA FDG-PET profile pseudo-code it cites:

* ``RescaleSlope`` is applied slice by slice; a non-zero ``RescaleIntercept`` is refused.
* ``Units``: ``BQML``; ``GML`` with ``SUVType`` BW (or empty), LBM (Morgan), LBMJAMES128, LBMJANMA,
  IBW (``PatientSex`` "O" uses the mean of the male and female normalisation masses); ``CM2ML``
  (BSA, Du Bois); ``CNTS`` with the Philips private Activity Concentration Scale Factor
  (7053,1009) or SUV Scale Factor (7053,1000). Everything else is refused.
* ``DecayCorrection``: ``START`` (reference time from Series Date/Time unless it lies after the
  earliest acquisition; then the GE private PET scan date-time (0009,100D); else back-computed
  from acquisition time, Frame Reference Time and Actual Frame Duration), ``ADMIN`` and ``NONE``
  (every slice is decay-corrected to the acquisition start with its own acquisition time and frame
  duration).
* ``RadionuclideTotalDose`` in Bq or MBq (decided by magnitude), injection from
  ``RadiopharmaceuticalStartDateTime`` or ``RadiopharmaceuticalStartTime`` plus the scan date
  (injection before midnight, scan after midnight handled), half-life from
  ``RadionuclideHalfLife`` or from ``RadionuclideCodeSequence``, ``PatientWeight`` in kg (values
  above 1000 are grams). The dose and injection rules are those of
  :mod:`prrtquant.dicom.radiopharmaceutical`, shared with the SPECT ingest.

Anything that is missing or cannot be interpreted raises :class:`SuvError` naming the series and
the attribute; every fallback or interpretation that was needed is listed in
:attr:`PetConversion.notes`.

>>> round(lbm_james_kg(70.0, 1.75, "M"), 2)
56.52
>>> round(bsa_dubois_m2(70.0, 1.75), 4)
1.8481
"""

from __future__ import annotations

import datetime
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pydicom
from pydicom.tag import BaseTag, Tag

from .. import radionuclides
from ..errors import SuvError
from .radiopharmaceutical import INJECTION_AFTER_SCAN_TOLERANCE, injection_datetime, total_dose_bq
from .values import element_value as _get
from .values import number as _number
from .values import parse_date as _parse_date
from .values import parse_datetime as _parse_datetime
from .values import parse_time as _parse_time
from .values import series_datetime
from .values import text as _text
from .suv_norms import (
    _frame_decay_factor,
    average_count_rate_time_s,
    bsa_dubois_m2,
    ibw_kg,
    lbm_james_kg,
    lbm_janmahasatian_kg,
    lbm_morgan_kg,
)

__all__ = ["PetConversion", "convert_pet_series"]

Array = np.ndarray

TAG_PHILIPS_SUV_SCALE = Tag(0x7053, 0x1000)
TAG_PHILIPS_ACTIVITY_SCALE = Tag(0x7053, 0x1009)
TAG_GE_SCAN_DATETIME = Tag(0x0009, 0x100D)

#: Largest spread of the back-computed START reference times across slices that is accepted.
_REFERENCE_SPREAD_LIMIT_S = 30.0


@dataclass(frozen=True)
class PetConversion:
    """Result of :func:`convert_pet_series`.

    Attributes
    ----------
    bqml : numpy.ndarray
        (z, y, x) float64 activity concentration in Bq/mL decay-corrected to ``reference_time``
        (for ``DecayCorrection`` NONE every slice has been corrected to ``reference_time``).
    suvbw : numpy.ndarray
        (z, y, x) float64 body-weight SUV (g/mL), ``bqml * suv_bw_factor``.
    suv_bw_factor : float
        ``weight_g / dose_at_reference_time_Bq``.
    reference_time : datetime.datetime
        Time the concentrations refer to.
    injection_time : datetime.datetime
        Radiopharmaceutical administration time.
    injected_activity_bq : float
        Administered activity at ``injection_time`` in Bq.
    half_life_s : float
        Radionuclide half-life used for every decay correction.
    weight_kg : float
        Patient weight used for the SUVs (the override if one was given).
    height_m, sex : float or None, str or None
        ``PatientSize`` in m and ``PatientSex`` ("M", "F", "O") when known.
    units_in : str
        Header ``Units``.
    decay_correction : str
        Header ``DecayCorrection``.
    radionuclide : str or None
        E.g. "F-18", "Ga-68", identified from the code sequence and the half-life.
    sul_james_factor, sul_janmahasatian_factor : float or None
        SUL = ``bqml * factor`` (lean body mass in g over dose); set when height and sex M/F are known.
    suv_bsa_factor : float or None
        SUV-BSA = ``bqml * factor`` (Du Bois body surface area in cm² over dose), when height is known.
    notes : tuple of str
        Every fallback and interpretation that was used.
    """

    bqml: Array
    suvbw: Array
    suv_bw_factor: float
    reference_time: datetime.datetime
    injection_time: datetime.datetime
    injected_activity_bq: float
    half_life_s: float
    weight_kg: float
    height_m: float | None
    sex: str | None
    units_in: str
    decay_correction: str
    radionuclide: str | None
    sul_james_factor: float | None
    sul_janmahasatian_factor: float | None
    suv_bsa_factor: float | None
    notes: tuple[str, ...]
    #: acquisition start (earliest AcquisitionTime, else SeriesTime): what "injection to scan" refers to
    scan_start: datetime.datetime | None = None
    #: PatientWeight in kg as the header gives it (grams converted), None when absent; ``weight_kg`` may be an override
    header_weight_kg: float | None = None

    @property
    def dose_at_reference_bq(self) -> float:
        """Administered activity decayed to :attr:`reference_time` (Bq)."""
        dt = (self.reference_time - self.injection_time).total_seconds()
        return self.injected_activity_bq * math.exp(-math.log(2.0) / self.half_life_s * dt)


# --------------------------------------------------------------------------------------------
# conversion
# --------------------------------------------------------------------------------------------

class _Ctx:
    """Error naming and note collection for one series."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.notes: list[str] = []

    def error(self, msg: str) -> SuvError:
        return SuvError(f"{self.name}: {msg}")

    def note(self, msg: str) -> None:
        if msg not in self.notes:
            self.notes.append(msg)


def _series_name(datasets: Sequence[pydicom.Dataset], source: str | None) -> str:
    if source:
        return str(source)
    if datasets:
        fn = getattr(datasets[0], "filename", None)
        if isinstance(fn, str) and fn:
            return fn
        uid = datasets[0].get("SeriesInstanceUID")
        if uid:
            return f"series {uid}"
    return "<unnamed PET series>"




def _file(ds: pydicom.Dataset) -> str:
    """The file a slice was read from (for messages), or '?'."""
    return str(getattr(ds, "filename", None) or "?")


def _num_attr(ctx: _Ctx, ds: pydicom.Dataset, key: str | BaseTag, label: str) -> float | None:
    try:
        return _number(_get(ds, key))
    except ValueError as exc:
        raise ctx.error(f"{label} cannot be read as a number ({exc})") from None


def _same_everywhere(ctx: _Ctx, datasets: Sequence[pydicom.Dataset], keyword: str) -> Any:
    vals = [_text(_get(ds, keyword)) for ds in datasets]
    if len(set(vals)) > 1:
        raise ctx.error(f"{keyword} differs between slices ({sorted(set(map(str, vals)))})")
    return _get(datasets[0], keyword)


def _slice_acquisition(ctx: _Ctx, ds: pydicom.Dataset, series_dt: datetime.datetime | None
                       ) -> datetime.datetime | None:
    try:
        dt, tz = _parse_datetime(_get(ds, "AcquisitionDateTime"))
        if dt is not None:
            if tz:
                ctx.note("UTC offset of AcquisitionDateTime ignored (all times taken as local)")
            return dt
        t = _parse_time(_get(ds, "AcquisitionTime"))
        if t is None:
            return None
        d = _parse_date(_get(ds, "AcquisitionDate"))
        if d is not None:
            return datetime.datetime.combine(d, t)
        if series_dt is None:
            return None
        ctx.note("AcquisitionDate missing: acquisition times combined with the series date")
        out = datetime.datetime.combine(series_dt.date(), t)
        if series_dt - out > datetime.timedelta(hours=12):  # acquisition continued past midnight
            out += datetime.timedelta(days=1)
        return out
    except ValueError as exc:
        raise ctx.error(f"acquisition date/time cannot be parsed ({exc})") from None


def _series_datetime(ctx: _Ctx, ds: pydicom.Dataset) -> datetime.datetime | None:
    try:
        return series_datetime(ds, ctx.note)
    except ValueError as exc:
        raise ctx.error(f"SeriesDate/SeriesTime cannot be parsed ({exc})") from None


def _frame_timing(ctx: _Ctx, ds: pydicom.Dataset, index: int, need_reference: bool
                  ) -> tuple[float, float | None]:
    """(ActualFrameDuration s, FrameReferenceTime s or None) of one slice; missing -> SuvError."""
    dur_ms = _num_attr(ctx, ds, "ActualFrameDuration", "ActualFrameDuration (0018,1242)")
    if dur_ms is None or dur_ms < 0:
        raise ctx.error(f"ActualFrameDuration (0018,1242) missing or invalid on slice {index}")
    ref_ms = None
    if need_reference:
        ref_ms = _num_attr(ctx, ds, "FrameReferenceTime", "FrameReferenceTime (0054,1300)")
        if ref_ms is None:
            raise ctx.error(f"FrameReferenceTime (0054,1300) missing on slice {index}")
    return dur_ms / 1000.0, None if ref_ms is None else ref_ms / 1000.0


@dataclass(frozen=True)
class _SeriesKind:
    """What the header says the stored values are: Units, DecayCorrection and SUVType, upper-cased."""

    units: str
    decay: str
    suv_type: str


@dataclass(frozen=True)
class _Patient:
    """Body size used for the SUVs: ``weight_kg`` (the override if given) and the header's own values."""

    weight_kg: float
    header_weight_kg: float | None
    height_m: float | None
    sex: str | None  # "M", "F", "O" or None
    sex_raw: str  # PatientSex as recorded (upper case), for messages


@dataclass(frozen=True)
class _Administration:
    """The first Radiopharmaceutical Information Sequence item and what it gives."""

    item: pydicom.Dataset
    dose_bq: float
    half_life_s: float
    radionuclide: str | None


@dataclass(frozen=True)
class _ScanTimes:
    """Series date-time, per-slice acquisition date-times (None where unknown) and the acquisition start."""

    series_dt: datetime.datetime | None
    acquisition: tuple[datetime.datetime | None, ...]
    scan_start: datetime.datetime

    @property
    def earliest_acquisition(self) -> datetime.datetime | None:
        """The earliest known per-slice acquisition date-time, None when no slice has one."""
        known = [t for t in self.acquisition if t is not None]
        return min(known) if known else None


@dataclass(frozen=True)
class _SuvFactors:
    """Factors from Bq/mL to SUVbw, SUL (James, Janmahasatian) and SUV-BSA; None where not computable."""

    suv_bw: float
    sul_james: float | None
    sul_janmahasatian: float | None
    suv_bsa: float | None


def _check_series_kind(ctx: _Ctx, datasets: Sequence[pydicom.Dataset]) -> _SeriesKind:
    """One PET series of single-frame slices with supported Units and DecayCorrection, else SuvError."""
    first = datasets[0]
    modality = _text(_get(first, "Modality"))
    if modality not in (None, "PT"):
        raise ctx.error(f"Modality is {modality!r}, not 'PT'")
    uids = {_text(_get(ds, "SeriesInstanceUID")) for ds in datasets}
    if len(uids) > 1:
        raise ctx.error(f"slices belong to {len(uids)} different series (SeriesInstanceUID)")
    for i, ds in enumerate(datasets):
        n_frames = _num_attr(ctx, ds, "NumberOfFrames", "NumberOfFrames")
        if n_frames is not None and n_frames > 1:
            raise ctx.error(f"slice {i} is multi-frame (NumberOfFrames {int(n_frames)}); "
                            "one single-frame file per slice is expected")

    units = (_text(_same_everywhere(ctx, datasets, "Units")) or "").upper()
    if not units:
        raise ctx.error("Units (0054,1001) missing")
    decay = (_text(_same_everywhere(ctx, datasets, "DecayCorrection")) or "").upper()
    if not decay:
        raise ctx.error("DecayCorrection (0054,1102) missing")
    if decay not in ("START", "ADMIN", "NONE"):
        raise ctx.error(f"DecayCorrection {decay!r} is not START, ADMIN or NONE")
    suv_type = (_text(_same_everywhere(ctx, datasets, "SUVType")) or "").upper()
    corrected_raw = _get(first, "CorrectedImage") or []
    if isinstance(corrected_raw, str):
        corrected_raw = [corrected_raw]
    corrected = [str(v).strip().upper() for v in corrected_raw]
    if corrected:
        if decay in ("START", "ADMIN") and "DECY" not in corrected:
            ctx.note(f"DecayCorrection is {decay} but CorrectedImage lacks DECY; DecayCorrection followed")
        if decay == "NONE" and "DECY" in corrected:
            ctx.note("DecayCorrection is NONE but CorrectedImage lists DECY; DecayCorrection followed")
    return _SeriesKind(units=units, decay=decay, suv_type=suv_type)


def _rescaled_values(ctx: _Ctx, datasets: Sequence[pydicom.Dataset]) -> Array:
    """(z, y, x) float64 stored values with RescaleSlope applied slice by slice, in header Units."""
    slabs: list[Array] = []
    slopes: list[float] = []
    for i, ds in enumerate(datasets):
        if "PixelData" not in ds:
            raise ctx.error(f"slice {i} has no PixelData")
        try:
            px = np.asarray(ds.pixel_array, dtype=np.float64)
        except Exception as exc:  # decoder missing, truncated data, ...
            raise ctx.error(f"PixelData of slice {i} cannot be decoded ({exc})") from None
        if px.ndim != 2:
            raise ctx.error(f"slice {i} pixel array has shape {px.shape}, expected 2-D")
        if slabs and px.shape != slabs[0].shape:
            raise ctx.error(f"slice {i} has shape {px.shape}, slice 0 has {slabs[0].shape}")
        slope = _num_attr(ctx, ds, "RescaleSlope", "RescaleSlope (0028,1053)")
        intercept = _num_attr(ctx, ds, "RescaleIntercept", "RescaleIntercept (0028,1052)")
        if slope is None:
            if any(_get(other, "RescaleSlope") not in (None, "") for other in datasets):
                raise ctx.error(f"RescaleSlope (0028,1053) missing on slice {i} ({_file(ds)}) but present on other "
                            f"slices")
            slope = 1.0
            if i == 0:
                ctx.note("RescaleSlope missing on every slice: 1.0 assumed (identity modality LUT)")
        if intercept not in (None, 0.0):
            raise ctx.error(f"RescaleIntercept (0028,1052) is {intercept} on slice {i} ({_file(ds)}); "
                            "PET requires 0")
        if not (math.isfinite(slope) and slope > 0):
            raise ctx.error(f"RescaleSlope (0028,1053) is {slope} on slice {i} ({_file(ds)})")
        slopes.append(slope)
        with np.errstate(over="ignore", invalid="ignore"):
            slab = px * slope
        if not np.all(np.isfinite(slab)):
            raise ctx.error(f"RescaleSlope (0028,1053) {slope:g} on slice {i} ({_file(ds)}) gives values that are "
                            f"not finite")
        slabs.append(slab)
    values = np.stack(slabs)
    if len(set(slopes)) > 1:
        ctx.note(f"RescaleSlope varies between slices ({len(set(slopes))} values), applied slice-wise")
    return values


def _patient(ctx: _Ctx, first: pydicom.Dataset, weight_kg_override: float | None) -> _Patient:
    """Weight (header in kg or grams, or the override), height (m or cm) and sex of the patient."""
    header_weight = _num_attr(ctx, first, "PatientWeight", "PatientWeight (0010,1030)")
    if header_weight is not None and not header_weight > 0:
        header_weight = None
    if header_weight is not None and header_weight > 1000.0:
        ctx.note(f"PatientWeight {header_weight:g} > 1000 taken as grams: {header_weight / 1000.0:g} kg")
        header_weight /= 1000.0
    if weight_kg_override is not None:
        if not (math.isfinite(weight_kg_override) and weight_kg_override > 0):
            raise ctx.error(f"weight override {weight_kg_override!r} kg is not a positive number")
        weight_kg = float(weight_kg_override)
        hw = "missing" if header_weight is None else f"{header_weight:g} kg"
        ctx.note(f"weight from override: {weight_kg:g} kg (PatientWeight {hw})")
    elif header_weight is None:
        raise ctx.error("PatientWeight (0010,1030) missing or zero and no weight override given")
    else:
        weight_kg = header_weight

    height_m = _num_attr(ctx, first, "PatientSize", "PatientSize (0010,1020)")
    if height_m is not None and not height_m > 0:
        height_m = None
    if height_m is not None and height_m > 3.0:
        if 50.0 <= height_m <= 250.0:
            ctx.note(f"PatientSize {height_m:g} taken as cm: {height_m / 100.0:g} m")
            height_m /= 100.0
        else:
            ctx.note(f"PatientSize {height_m:g} is not a plausible height in m; ignored")
            height_m = None
    sex_raw = (_text(_get(first, "PatientSex")) or "").upper()
    sex = sex_raw if sex_raw in ("M", "F", "O") else None
    return _Patient(weight_kg=weight_kg, header_weight_kg=header_weight, height_m=height_m, sex=sex,
                    sex_raw=sex_raw)


def _administration(ctx: _Ctx, first: pydicom.Dataset) -> _Administration:
    """The first Radiopharmaceutical Information Sequence item, its dose in Bq and its radionuclide."""
    rpseq = _get(first, "RadiopharmaceuticalInformationSequence")
    if not rpseq:
        raise ctx.error("RadiopharmaceuticalInformationSequence (0054,0016) missing")
    if len(rpseq) > 1:
        ctx.note(f"RadiopharmaceuticalInformationSequence has {len(rpseq)} items; the first is used")
    rp = rpseq[0]

    dose_raw = _num_attr(ctx, rp, "RadionuclideTotalDose", "RadionuclideTotalDose (0018,1074)")
    if dose_raw is None:
        raise ctx.error("RadionuclideTotalDose (0018,1074) missing")
    if not dose_raw > 0:
        raise ctx.error(f"RadionuclideTotalDose (0018,1074) is {dose_raw:g}")
    try:
        dose_bq, dose_note = total_dose_bq(dose_raw)
    except ValueError as exc:
        raise ctx.error(f"RadionuclideTotalDose (0018,1074) {exc}") from exc
    if dose_note:
        ctx.note(dose_note)

    half_life, nuclide_name = _half_life(ctx, rp)
    return _Administration(item=rp, dose_bq=dose_bq, half_life_s=half_life, radionuclide=nuclide_name)


def _half_life(ctx: _Ctx, rp: pydicom.Dataset) -> tuple[float, str | None]:
    """(half-life in s, radionuclide name or None) from RadionuclideHalfLife and the coded radionuclide."""
    code_nuclide: radionuclides.Radionuclide | None = None
    codes = _get(rp, "RadionuclideCodeSequence") or []
    if codes:
        item = codes[0]
        by_meaning = radionuclides.from_name(_text(_get(item, "CodeMeaning")) or "")
        cv = _text(_get(item, "CodeValue"))
        by_value = radionuclides.from_code(cv) if cv else None
        if by_meaning and by_value and by_meaning is not by_value:
            ctx.note(f"RadionuclideCodeSequence code {cv} and meaning {_get(item, 'CodeMeaning')!r} "
                     f"disagree; meaning used ({by_meaning.name})")
        code_nuclide = by_meaning or by_value
    if code_nuclide is None:
        rp_name = radionuclides.from_name(_text(_get(rp, "Radiopharmaceutical")) or "")
        code_nuclide = rp_name

    half_life = _num_attr(ctx, rp, "RadionuclideHalfLife", "RadionuclideHalfLife (0018,1075)")
    nuclide_name: str | None
    if half_life is not None and half_life > 0:
        by_hl = radionuclides.from_half_life(half_life)
        if code_nuclide is not None and abs(half_life - code_nuclide.half_life_s) > 0.01 * code_nuclide.half_life_s:
            raise ctx.error(f"RadionuclideHalfLife (0018,1075) {half_life:g} s does not match the coded "
                            f"radionuclide {code_nuclide.name} ({code_nuclide.half_life_s:g} s, 1 % tolerance); "
                            f"one of them is wrong")
        else:
            nuclide_name = code_nuclide.name if code_nuclide else (by_hl.name if by_hl else None)
    elif code_nuclide is not None:
        half_life = code_nuclide.half_life_s
        nuclide_name = code_nuclide.name
        ctx.note(f"RadionuclideHalfLife missing: {half_life:g} s for {nuclide_name} from "
                 "RadionuclideCodeSequence")
    else:
        raise ctx.error("RadionuclideHalfLife (0018,1075) missing and RadionuclideCodeSequence "
                        "(0054,0300) names no known radionuclide")
    return half_life, nuclide_name


def _scan_times(ctx: _Ctx, datasets: Sequence[pydicom.Dataset]) -> _ScanTimes:
    """Series date-time, every slice's acquisition date-time and the acquisition start (earliest of them)."""
    series_dt = _series_datetime(ctx, datasets[0])
    acq = tuple(_slice_acquisition(ctx, ds, series_dt) for ds in datasets)
    known_acq = [t for t in acq if t is not None]
    scan_start = min(known_acq) if known_acq else series_dt
    if scan_start is None:
        raise ctx.error("no acquisition or series time: AcquisitionTime (0008,0032) and "
                        "SeriesTime (0008,0031) missing")
    return _ScanTimes(series_dt=series_dt, acquisition=acq, scan_start=scan_start)


def _injection(ctx: _Ctx, rp: pydicom.Dataset, scan_start: datetime.datetime) -> datetime.datetime:
    """Injection date-time by :func:`.radiopharmaceutical.injection_datetime`, its refusals as SuvError."""
    try:
        return injection_datetime(rp, scan_start, ctx.note)
    except ValueError as exc:
        raise ctx.error(str(exc)) from None


def _reference_time(ctx: _Ctx, datasets: Sequence[pydicom.Dataset], decay: str, times: _ScanTimes,
                    injection: datetime.datetime, half_life_s: float) -> datetime.datetime:
    """Time the stored concentrations refer to, by DecayCorrection (START in QIBA order)."""
    ge_dt: datetime.datetime | None = None
    try:
        ge_dt, _ = _parse_datetime(_text(_get(datasets[0], TAG_GE_SCAN_DATETIME)))
    except ValueError:
        ctx.note("GE private scan date-time (0009,100D) present but unreadable; ignored")
    series_dt = times.series_dt
    earliest = times.earliest_acquisition
    if decay == "ADMIN":
        reference = injection
    elif decay == "NONE":
        reference = times.scan_start
        ctx.note("DecayCorrection NONE: every slice decay-corrected to the acquisition start with "
                 "its AcquisitionTime and ActualFrameDuration")
    elif series_dt is not None and (earliest is None or series_dt <= earliest):  # START, QIBA order
        reference = series_dt
        if earliest is None:
            ctx.note("reference time from SeriesDate/SeriesTime (no AcquisitionTime to check it)")
        if ge_dt is not None and abs((ge_dt - series_dt).total_seconds()) > 1.0:
            ctx.note(f"GE private scan date-time {ge_dt} differs from series time {series_dt}; "
                     "series time used (QIBA order)")
    elif ge_dt is not None:
        reference = ge_dt
        ctx.note("reference time from GE private scan datetime (0009,100D) "
                 "(series time after acquisition start or missing)")
    else:
        reference = _back_computed_reference(ctx, datasets, times, half_life_s)
    if (injection - reference) > INJECTION_AFTER_SCAN_TOLERANCE:
        raise ctx.error(f"decay-correction reference time {reference} is before the injection {injection}")
    return reference


def _back_computed_reference(ctx: _Ctx, datasets: Sequence[pydicom.Dataset], times: _ScanTimes,
                             half_life_s: float) -> datetime.datetime:
    """START reference time back-computed from AcquisitionTime, FrameReferenceTime, ActualFrameDuration."""
    refs: list[datetime.datetime] = []
    for i, (ds, t_acq) in enumerate(zip(datasets, times.acquisition)):
        if t_acq is None:
            raise ctx.error(f"AcquisitionTime (0008,0032) missing on slice {i}; needed to "
                            "back-compute the decay-correction reference time")
        dur_s, ref_s = _frame_timing(ctx, ds, i, need_reference=True)
        assert ref_s is not None
        t_ave = average_count_rate_time_s(dur_s, half_life_s)
        refs.append(t_acq + datetime.timedelta(seconds=t_ave - ref_s))
    r0 = min(refs)
    offsets = [(r - r0).total_seconds() for r in refs]
    if max(offsets) > _REFERENCE_SPREAD_LIMIT_S:
        raise ctx.error(f"back-computed decay-correction reference times spread over "
                        f"{max(offsets):.0f} s across slices")
    reference = r0 + datetime.timedelta(seconds=float(np.mean(offsets)))
    why = "series time after acquisition start" if times.series_dt is not None else "SeriesTime missing"
    ctx.note(f"reference time back-computed from AcquisitionTime, FrameReferenceTime and "
             f"ActualFrameDuration ({why})")
    return reference


def _per_slice_private(ctx: _Ctx, datasets: Sequence[pydicom.Dataset], tag: BaseTag, label: str
                       ) -> list[float | None]:
    """A private numeric attribute of every slice; None where missing or zero."""
    out: list[float | None] = []
    for ds in datasets:
        try:
            v = _number(_get(ds, tag))
        except ValueError as exc:
            raise ctx.error(f"{label} cannot be read ({exc})") from None
        out.append(v if v not in (None, 0.0) else None)
    return out


def _gml_norm_kg(ctx: _Ctx, suv_type: str, weight_kg: float, patient: _Patient) -> float:
    """Normalisation mass (kg) of Units GML with the given SUVType (empty taken as BW)."""
    st = suv_type or "BW"
    if not suv_type:
        ctx.note("Units GML with empty SUVType taken as body-weight SUV")
    if st == "BW":
        return weight_kg
    height_m, sex = patient.height_m, patient.sex
    if height_m is None and st != "BSA":
        raise ctx.error(f"Units GML with SUVType {st} needs PatientSize (0010,1020), which is "
                        "missing or invalid")
    if sex is None:
        raise ctx.error(f"Units GML with SUVType {st} needs PatientSex (0010,0040) M, F or O, "
                        f"got {patient.sex_raw or 'nothing'}")
    assert height_m is not None
    try:
        if st == "LBM":
            norm_kg = lbm_morgan_kg(weight_kg, height_m, sex)
        elif st == "LBMJAMES128":
            norm_kg = lbm_james_kg(weight_kg, height_m, sex)
        elif st == "LBMJANMA":
            norm_kg = lbm_janmahasatian_kg(weight_kg, height_m, sex)
        elif st == "IBW":
            norm_kg = ibw_kg(height_m, sex)
        else:
            raise ctx.error(f"Units GML with SUVType {st!r} is not supported")
    except ValueError as exc:
        if isinstance(exc, SuvError):
            raise
        raise ctx.error(f"SUVType {st}: {exc}") from None
    ctx.note(f"Units GML with SUVType {st} ({norm_kg:.3f} kg"
             f"{', mean of male and female' if sex == 'O' else ''}) converted to SUVbw")
    return norm_kg


def _interpret_units(ctx: _Ctx, datasets: Sequence[pydicom.Dataset], values: Array, kind: _SeriesKind,
                     patient: _Patient) -> tuple[Array | None, Array | None]:
    """(concentration, None) for concentration Units, (None, SUVbw as stored) for SUV Units; else SuvError."""
    units, suv_type = kind.units, kind.suv_type
    back_weight_kg = patient.header_weight_kg if patient.header_weight_kg is not None else patient.weight_kg
    if units == "BQML":
        return values, None
    if units == "CNTS":
        acsf = _per_slice_private(ctx, datasets, TAG_PHILIPS_ACTIVITY_SCALE,
                                  "Philips activity concentration scale factor (7053,1009)")
        suvsf = _per_slice_private(ctx, datasets, TAG_PHILIPS_SUV_SCALE,
                                   "Philips SUV scale factor (7053,1000)")
        if all(v is not None for v in acsf):
            ctx.note("Units CNTS converted with Philips activity concentration scale factor (7053,1009)")
            return values * np.asarray(acsf, dtype=float)[:, None, None], None
        if all(v is not None for v in suvsf):
            ctx.note("Units CNTS converted with Philips SUV scale factor (7053,1000) to SUVbw")
            return None, values * np.asarray(suvsf, dtype=float)[:, None, None]
        raise ctx.error("Units CNTS without a non-zero Philips activity concentration scale factor "
                        "(7053,1009) or SUV scale factor (7053,1000) on every slice")
    if units == "GML":
        norm_kg = _gml_norm_kg(ctx, suv_type, back_weight_kg, patient)
        return None, values * (back_weight_kg / norm_kg)
    if units == "CM2ML":
        if suv_type not in ("", "BSA"):
            raise ctx.error(f"Units CM2ML with SUVType {suv_type!r}; expected BSA")
        if patient.height_m is None:
            raise ctx.error("Units CM2ML needs PatientSize (0010,1020), which is missing or invalid")
        bsa_cm2 = bsa_dubois_m2(back_weight_kg, patient.height_m) * 1.0e4
        ctx.note(f"Units CM2ML (SUV-BSA, Du Bois {bsa_cm2 / 1e4:.4f} m²) converted to SUVbw")
        return None, values * (back_weight_kg * 1000.0 / bsa_cm2)
    raise ctx.error(f"Units {units!r} cannot be converted to activity concentration "
                    "(supported: BQML, GML, CM2ML, CNTS with Philips scale factors)")


def _bqml(ctx: _Ctx, datasets: Sequence[pydicom.Dataset], values: Array, kind: _SeriesKind, patient: _Patient,
          times: _ScanTimes, reference: datetime.datetime, half_life_s: float, dose_ref_bq: float) -> Array:
    """(z, y, x) float64 activity concentration in Bq/mL decay-corrected to ``reference``."""
    conc, suv_stored = _interpret_units(ctx, datasets, values, kind, patient)
    back_weight_kg = patient.header_weight_kg if patient.header_weight_kg is not None else patient.weight_kg
    if suv_stored is not None:
        if kind.decay == "NONE":
            raise ctx.error(f"Units {kind.units} (an SUV) with DecayCorrection NONE is ambiguous")
        if patient.header_weight_kg is None:
            ctx.note("PatientWeight missing: stored SUV converted back with the override weight")
        bqml = suv_stored * (dose_ref_bq / (back_weight_kg * 1000.0))
    elif kind.decay == "NONE":
        assert conc is not None
        lam = math.log(2.0) / half_life_s
        factors = np.empty(len(datasets))
        for i, (ds, t_acq) in enumerate(zip(datasets, times.acquisition)):
            if t_acq is None:
                raise ctx.error(f"AcquisitionTime (0008,0032) missing on slice {i}; needed for "
                                "DecayCorrection NONE")
            dur_s, _ = _frame_timing(ctx, ds, i, need_reference=False)
            factors[i] = _frame_decay_factor(dur_s, half_life_s) * math.exp(
                lam * (t_acq - reference).total_seconds())
        bqml = conc * factors[:, None, None]
    else:
        assert conc is not None
        bqml = conc
    return np.ascontiguousarray(bqml, dtype=np.float64)


def _suv_factors(ctx: _Ctx, patient: _Patient, dose_ref_bq: float) -> _SuvFactors:
    """SUVbw, SUL and SUV-BSA factors for the patient and the dose at the reference time."""
    weight_kg, height_m, sex = patient.weight_kg, patient.height_m, patient.sex
    suv_bw_factor = weight_kg * 1000.0 / dose_ref_bq
    sul_james = sul_janma = suv_bsa = None
    if height_m is not None:
        suv_bsa = bsa_dubois_m2(weight_kg, height_m) * 1.0e4 / dose_ref_bq
        if sex in ("M", "F"):
            try:
                sul_james = lbm_james_kg(weight_kg, height_m, sex) * 1000.0 / dose_ref_bq
            except ValueError:
                ctx.note("James lean body mass not positive for this weight and height; SUL (James) unset")
            sul_janma = lbm_janmahasatian_kg(weight_kg, height_m, sex) * 1000.0 / dose_ref_bq
    return _SuvFactors(suv_bw=suv_bw_factor, sul_james=sul_james, sul_janmahasatian=sul_janma,
                       suv_bsa=suv_bsa)


def convert_pet_series(datasets: Sequence[pydicom.Dataset], weight_kg_override: float | None = None,
                       source: str | None = None) -> PetConversion:
    """Convert one PET series (one slice per dataset) to Bq/mL and SUVbw.

    Parameters
    ----------
    datasets : sequence of pydicom.Dataset
        The slices of ONE series with pixel data, already in slice order (index 0 is z index 0
        of the output arrays).
    weight_kg_override : float, optional
        Patient weight in kg to use instead of ``PatientWeight`` (noted in the result).
    source : str, optional
        A name for error messages (e.g. the folder or the first file); defaults to the first
        slice's file name, else the SeriesInstanceUID.

    Returns
    -------
    PetConversion
        Concentration and SUV volumes plus every quantity and interpretation used.

    Raises
    ------
    SuvError
        When a required attribute is missing, contradictory or of an unsupported kind; the
        message names the series and the attribute.
    """
    ctx = _Ctx(_series_name(datasets, source))
    if len(datasets) == 0:
        raise ctx.error("no slices given")
    kind = _check_series_kind(ctx, datasets)
    values = _rescaled_values(ctx, datasets)
    patient = _patient(ctx, datasets[0], weight_kg_override)
    admin = _administration(ctx, datasets[0])
    times = _scan_times(ctx, datasets)
    injection = _injection(ctx, admin.item, times.scan_start)
    reference = _reference_time(ctx, datasets, kind.decay, times, injection, admin.half_life_s)
    lam = math.log(2.0) / admin.half_life_s
    dose_ref = admin.dose_bq * math.exp(-lam * (reference - injection).total_seconds())
    bqml = _bqml(ctx, datasets, values, kind, patient, times, reference, admin.half_life_s, dose_ref)
    suv = _suv_factors(ctx, patient, dose_ref)

    return PetConversion(
        bqml=bqml,
        suvbw=bqml * suv.suv_bw,
        suv_bw_factor=float(suv.suv_bw),
        reference_time=reference,
        injection_time=injection,
        injected_activity_bq=float(admin.dose_bq),
        half_life_s=float(admin.half_life_s),
        weight_kg=float(patient.weight_kg),
        height_m=None if patient.height_m is None else float(patient.height_m),
        sex=patient.sex,
        units_in=kind.units,
        decay_correction=kind.decay,
        radionuclide=admin.radionuclide,
        sul_james_factor=suv.sul_james,
        sul_janmahasatian_factor=suv.sul_janmahasatian,
        suv_bsa_factor=suv.suv_bsa,
        notes=tuple(ctx.notes),
        scan_start=times.scan_start,
        header_weight_kg=None if patient.header_weight_kg is None else float(patient.header_weight_kg),
    )
