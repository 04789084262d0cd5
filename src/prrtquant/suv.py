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
  above 1000 are grams).

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
import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import pydicom
from pydicom.tag import BaseTag, Tag

from . import radionuclides
from .dicom_values import number as _number
from .dicom_values import parse_date as _parse_date
from .dicom_values import parse_datetime as _parse_datetime
from .dicom_values import parse_time as _parse_time
from .dicom_values import text as _text

__all__ = [
    "SuvError",
    "PetConversion",
    "convert_pet_series",
    "lbm_james_kg",
    "lbm_janmahasatian_kg",
    "lbm_morgan_kg",
    "ibw_kg",
    "bsa_dubois_m2",
    "average_count_rate_time_s",
]

Array = np.ndarray

# Private attributes read by tag number (their private creators are often missing or anonymised).
TAG_PHILIPS_SUV_SCALE = Tag(0x7053, 0x1000)
TAG_PHILIPS_ACTIVITY_SCALE = Tag(0x7053, 0x1009)
TAG_GE_SCAN_DATETIME = Tag(0x0009, 0x100D)

#: Injection time may lie this far after the acquisition start (dynamic scans started just before
#: the injection); a time-only injection later than that is taken to be on the previous day.
_INJECTION_AFTER_SCAN_TOLERANCE = datetime.timedelta(minutes=15)
#: Largest spread of the back-computed START reference times across slices that is accepted.
_REFERENCE_SPREAD_LIMIT_S = 30.0
#: RadionuclideTotalDose below this is read as MBq, from _DOSE_BQ_MIN on as Bq; in between refused.
_DOSE_MBQ_MAX = 2.0e4
_DOSE_BQ_MIN = 1.0e6


class SuvError(ValueError):
    """A PET series that cannot be converted to Bq/mL or SUV; the message names the series and why."""


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
# body-size formulas
# --------------------------------------------------------------------------------------------

def _sex_key(sex: str | None) -> str:
    s = (sex or "").strip().upper()
    if s in ("M", "MALE"):
        return "M"
    if s in ("F", "FEMALE"):
        return "F"
    if s in ("O", "OTHER"):
        return "O"
    raise ValueError(f"sex must be 'M', 'F' or 'O', got {sex!r}")


def _check_body(weight_kg: float, height_m: float | None = None) -> None:
    if not (math.isfinite(weight_kg) and weight_kg > 0):
        raise ValueError(f"weight must be a positive number of kg, got {weight_kg!r}")
    if height_m is not None and not (math.isfinite(height_m) and height_m > 0):
        raise ValueError(f"height must be a positive number of m, got {height_m!r}")


def _by_sex(sex: str, male: Callable[[], float], female: Callable[[], float]) -> float:
    key = _sex_key(sex)
    if key == "M":
        return male()
    if key == "F":
        return female()
    return 0.5 * (male() + female())  # "O": mean of the sex-specific values (IBSI SUV manual)


def _positive(value: float, what: str) -> float:
    if not value > 0:
        raise ValueError(f"{what} is {value:.3g} kg (formula outside its valid range)")
    return value


def lbm_james_kg(weight_kg: float, height_m: float, sex: str) -> float:
    """Lean body mass after James (1976), the DICOM ``LBMJAMES128`` variant.

    Male ``1.10 W - 128 (W/H)^2``, female ``1.07 W - 148 (W/H)^2`` with W in kg and H in cm.

    Parameters
    ----------
    weight_kg : float
        Body weight in kg.
    height_m : float
        Height in m.
    sex : str
        "M", "F" or "O" (mean of the male and female values).

    Returns
    -------
    float
        Lean body mass in kg.

    Raises
    ------
    ValueError
        For invalid inputs or a non-positive result (the formula fails for BMI above ~40).
    """
    _check_body(weight_kg, height_m)
    h_cm = 100.0 * height_m
    r2 = (weight_kg / h_cm) ** 2
    return _positive(_by_sex(sex, lambda: 1.10 * weight_kg - 128.0 * r2,
                             lambda: 1.07 * weight_kg - 148.0 * r2), "James lean body mass")


def lbm_morgan_kg(weight_kg: float, height_m: float, sex: str) -> float:
    """Lean body mass for DICOM ``SUVType`` "LBM" (Morgan): male ``1.10 W - 120 (W/H)^2``, female as James.

    Parameters
    ----------
    weight_kg, height_m : float
        Body weight (kg) and height (m).
    sex : str
        "M", "F" or "O".

    Returns
    -------
    float
        Lean body mass in kg.
    """
    _check_body(weight_kg, height_m)
    r2 = (weight_kg / (100.0 * height_m)) ** 2
    return _positive(_by_sex(sex, lambda: 1.10 * weight_kg - 120.0 * r2,
                             lambda: 1.07 * weight_kg - 148.0 * r2), "Morgan lean body mass")


def lbm_janmahasatian_kg(weight_kg: float, height_m: float, sex: str) -> float:
    """Lean body mass after Janmahasatian et al. (2005), DICOM ``LBMJANMA``.

    Male ``9270 W / (6680 + 216 BMI)``, female ``9270 W / (8780 + 244 BMI)``, BMI = W / H² (kg, m).

    Parameters
    ----------
    weight_kg, height_m : float
        Body weight (kg) and height (m).
    sex : str
        "M", "F" or "O" (mean of the male and female values).

    Returns
    -------
    float
        Lean body mass in kg.
    """
    _check_body(weight_kg, height_m)
    bmi = weight_kg / height_m ** 2
    return _by_sex(sex, lambda: 9270.0 * weight_kg / (6680.0 + 216.0 * bmi),
                   lambda: 9270.0 * weight_kg / (8780.0 + 244.0 * bmi))


def ibw_kg(height_m: float, sex: str) -> float:
    """Ideal body weight for DICOM ``SUVType`` "IBW" as given in the IBSI SUV manual.

    Male ``48.0 + 1.06 (H - 152)``, female ``45.5 + 0.91 (H - 152)`` with H in cm.

    Parameters
    ----------
    height_m : float
        Height in m.
    sex : str
        "M", "F" or "O" (mean of the male and female values).

    Returns
    -------
    float
        Ideal body weight in kg.
    """
    _check_body(1.0, height_m)
    h_cm = 100.0 * height_m
    return _positive(_by_sex(sex, lambda: 48.0 + 1.06 * (h_cm - 152.0),
                             lambda: 45.5 + 0.91 * (h_cm - 152.0)), "ideal body weight")


def bsa_dubois_m2(weight_kg: float, height_m: float) -> float:
    """Body surface area after Du Bois & Du Bois (1916): ``0.007184 H^0.725 W^0.425`` (H cm, W kg).

    Parameters
    ----------
    weight_kg, height_m : float
        Body weight (kg) and height (m).

    Returns
    -------
    float
        Body surface area in m².
    """
    _check_body(weight_kg, height_m)
    return 0.007184 * (100.0 * height_m) ** 0.725 * weight_kg ** 0.425


def average_count_rate_time_s(frame_duration_s: float, half_life_s: float) -> float:
    """Time after frame start at which the instantaneous activity equals the frame average.

    ``T_ave = ln(λT / (1 - exp(-λT))) / λ`` (IBSI SUV manual, QIBA); ``T/2`` in the limit λT → 0.

    Parameters
    ----------
    frame_duration_s : float
        Frame duration T in s.
    half_life_s : float
        Half-life in s.

    Returns
    -------
    float
        T_ave in s.
    """
    lam = math.log(2.0) / half_life_s
    x = lam * frame_duration_s
    if x < 1e-9:
        return 0.5 * frame_duration_s
    return math.log(x / -math.expm1(-x)) / lam


def _frame_decay_factor(frame_duration_s: float, half_life_s: float) -> float:
    """``λT / (1 - exp(-λT))``: frame-average activity to activity at frame start."""
    lam = math.log(2.0) / half_life_s
    x = lam * frame_duration_s
    return 1.0 if x < 1e-12 else x / -math.expm1(-x)


# --------------------------------------------------------------------------------------------
# radionuclides: DICOM CID 4020 codes (SRT and SNOMED CT) and half-lives
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Nuclide:
    name: str
    half_life_s: float
    codes: tuple[str, ...]
    meaning: str  # element name as in the CID 4020 code meaning, e.g. "fluorine"
    mass: int


# Half-lives: NNDC/ENSDF; F-18 109.77 min as used by scanners and QIBA; Ga-68 and Lu-177 from
# prrtquant.radionuclides (single source for the project's own nuclides).
_NUCLIDES: tuple[_Nuclide, ...] = (
    _Nuclide("C-11", 20.364 * 60.0, ("C-105A1", "40565003"), "carbon", 11),
    _Nuclide("N-13", 9.965 * 60.0, ("C-107A1", "21576001"), "nitrogen", 13),
    _Nuclide("O-15", 122.24, ("C-B1038", "129504001"), "oxygen", 15),
    _Nuclide("F-18", 6586.2, ("C-111A1", "77004003"), "fluorine", 18),
    _Nuclide("Cu-64", 12.701 * 3600.0, ("C-127A2", "3932008"), "copper", 64),
    _Nuclide("Ga-68", radionuclides.GA68.half_life_s, ("C-131A3", "35337001"), "gallium", 68),
    _Nuclide("Ge-68", 270.95 * 86400.0, ("C-128A2", "53315004"), "germanium", 68),
    _Nuclide("Rb-82", 1.2575 * 60.0, ("C-159A2", "79197006"), "rubidium", 82),
    _Nuclide("Zr-89", 78.41 * 3600.0, ("C-168A4", "63360001"), "zirconium", 89),
    _Nuclide("I-124", 4.1760 * 86400.0, ("C-114A5", "40937006"), "iodine", 124),
    _Nuclide("Lu-177", radionuclides.LU177.half_life_s, (radionuclides.LU177.code_value,), "lutetium", 177),
)
_SYMBOLS = {"c": "carbon", "n": "nitrogen", "o": "oxygen", "f": "fluorine", "cu": "copper",
            "ga": "gallium", "ge": "germanium", "rb": "rubidium", "zr": "zirconium", "i": "iodine",
            "lu": "lutetium"}


def _nuclide_from_meaning(text: str) -> _Nuclide | None:
    """'^18^Fluorine', 'F-18', '18F', 'Fluorine-18', 'Ga68' ... -> nuclide."""
    t = text.lower().replace("^", " ")
    mass_m = re.search(r"\d+", t)
    word_m = re.search(r"[a-z]+", t)
    if not mass_m or not word_m:
        return None
    mass, word = int(mass_m.group()), _SYMBOLS.get(word_m.group(), word_m.group())
    for n in _NUCLIDES:
        if n.mass == mass and n.meaning == word:
            return n
    return None


def _nuclide_from_half_life(half_life_s: float, rel_tol: float = 0.01) -> _Nuclide | None:
    for n in _NUCLIDES:
        if abs(half_life_s - n.half_life_s) <= rel_tol * n.half_life_s:
            return n
    return None


def total_dose_bq(value: float) -> tuple[float, str | None]:
    """RadionuclideTotalDose in Bq, and a note when it was read as MBq.

    The unit is told by magnitude (PET IODs use Bq, the NM isotope module MBq): below 2e4 it is
    MBq, from 1e6 on Bq; in between is ambiguous and raises ValueError.

    >>> total_dose_bq(7400.0)
    (7400000000.0, 'dose in MBq converted to Bq (RadionuclideTotalDose 7400)')
    """
    if value < _DOSE_MBQ_MAX:
        return value * 1.0e6, f"dose in MBq converted to Bq (RadionuclideTotalDose {value:g})"
    if value >= _DOSE_BQ_MIN:
        return value, None
    raise ValueError(f"{value:g} is ambiguous (neither a plausible MBq nor Bq value)")


def radionuclide_of(rp: pydicom.Dataset) -> str | None:
    """Radionuclide of a Radiopharmaceutical Information Sequence item ("Ga-68", "Lu-177", ...).

    From the Radionuclide Code Sequence (meaning first, then code value), else the
    Radiopharmaceutical name, else RadionuclideHalfLife; None when nothing identifies it.
    """
    codes = _get(rp, "RadionuclideCodeSequence") or []
    if codes:
        item = codes[0]
        cv = _text(_get(item, "CodeValue"))
        found = _nuclide_from_meaning(_text(_get(item, "CodeMeaning")) or "") or (
            next((n for n in _NUCLIDES if cv in n.codes), None) if cv else None)
        if found:
            return found.name
    found = _nuclide_from_meaning(_text(_get(rp, "Radiopharmaceutical")) or "")
    if found:
        return found.name
    hl = _number(_get(rp, "RadionuclideHalfLife"))
    found = _nuclide_from_half_life(hl) if hl else None
    return found.name if found else None


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


def _get(ds: pydicom.Dataset, key: str | BaseTag) -> Any:
    el = ds.get(key) if isinstance(key, BaseTag) else ds.get(key, None)
    if isinstance(el, pydicom.DataElement):
        return el.value
    return el


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
        t = _parse_time(_get(ds, "SeriesTime"))
        d = _parse_date(_get(ds, "SeriesDate"))
    except ValueError as exc:
        raise ctx.error(f"SeriesDate/SeriesTime cannot be parsed ({exc})") from None
    if t is None:
        return None
    if d is None:
        for kw in ("AcquisitionDate", "StudyDate"):
            try:
                d = _parse_date(_get(ds, kw))
            except ValueError:
                d = None
            if d is not None:
                ctx.note(f"SeriesDate missing: SeriesTime combined with {kw}")
                break
    return None if d is None else datetime.datetime.combine(d, t)


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
    first = datasets[0]

    # ---- one series, PET, single-frame slices ------------------------------------------------
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

    # ---- pixels, slice-wise rescale -------------------------------------------------------
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
    values = np.stack(slabs)  # stored values with slope applied, in header Units
    if len(set(slopes)) > 1:
        ctx.note(f"RescaleSlope varies between slices ({len(set(slopes))} values), applied slice-wise")

    # ---- patient ----------------------------------------------------------------------------
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

    # ---- radiopharmaceutical ----------------------------------------------------------------
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

    code_nuclide: _Nuclide | None = None
    codes = _get(rp, "RadionuclideCodeSequence") or []
    if codes:
        item = codes[0]
        by_meaning = _nuclide_from_meaning(_text(_get(item, "CodeMeaning")) or "")
        cv = _text(_get(item, "CodeValue"))
        by_value = next((n for n in _NUCLIDES if cv in n.codes), None) if cv else None
        if by_meaning and by_value and by_meaning is not by_value:
            ctx.note(f"RadionuclideCodeSequence code {cv} and meaning {_get(item, 'CodeMeaning')!r} "
                     f"disagree; meaning used ({by_meaning.name})")
        code_nuclide = by_meaning or by_value
    if code_nuclide is None:
        rp_name = _nuclide_from_meaning(_text(_get(rp, "Radiopharmaceutical")) or "")
        code_nuclide = rp_name

    half_life = _num_attr(ctx, rp, "RadionuclideHalfLife", "RadionuclideHalfLife (0018,1075)")
    nuclide_name: str | None
    if half_life is not None and half_life > 0:
        by_hl = _nuclide_from_half_life(half_life)
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
    lam = math.log(2.0) / half_life

    # ---- times ------------------------------------------------------------------------------
    series_dt = _series_datetime(ctx, first)
    acq = [_slice_acquisition(ctx, ds, series_dt) for ds in datasets]
    known_acq = [t for t in acq if t is not None]
    scan_start = min(known_acq) if known_acq else series_dt
    if scan_start is None:
        raise ctx.error("no acquisition or series time: AcquisitionTime (0008,0032) and "
                        "SeriesTime (0008,0031) missing")

    inj_dt_text = _text(_get(rp, "RadiopharmaceuticalStartDateTime"))
    try:
        inj_dt, inj_tz = _parse_datetime(inj_dt_text)
        inj_t = _parse_time(_get(rp, "RadiopharmaceuticalStartTime"))
        inj_date = _parse_date(inj_dt_text[:8]) if inj_dt is None and inj_dt_text else None
    except ValueError as exc:
        raise ctx.error(f"radiopharmaceutical start time cannot be parsed ({exc})") from None
    if inj_dt is not None:
        if inj_tz:
            ctx.note("UTC offset of RadiopharmaceuticalStartDateTime ignored (all times taken as local)")
        if inj_dt - scan_start > _INJECTION_AFTER_SCAN_TOLERANCE:
            raise ctx.error(f"RadiopharmaceuticalStartDateTime {inj_dt} is after the acquisition "
                            f"start {scan_start}")
        injection = inj_dt
    elif inj_t is not None and inj_date is not None:
        injection = datetime.datetime.combine(inj_date, inj_t)
        ctx.note("RadiopharmaceuticalStartDateTime holds only a date: combined with RadiopharmaceuticalStartTime")
        if injection - scan_start > _INJECTION_AFTER_SCAN_TOLERANCE:
            raise ctx.error(f"injection {injection} is after the acquisition start {scan_start}")
    elif inj_t is not None:
        injection = datetime.datetime.combine(scan_start.date(), inj_t)
        ctx.note("injection date not recorded: RadiopharmaceuticalStartTime combined with the scan date")
        if injection - scan_start > _INJECTION_AFTER_SCAN_TOLERANCE:
            injection -= datetime.timedelta(days=1)
            ctx.note("injection time later than scan time of day: injection taken on the previous "
                     "day (scan after midnight)")
    else:
        raise ctx.error("RadiopharmaceuticalStartDateTime (0018,1078) and RadiopharmaceuticalStartTime "
                        "(0018,1072) missing")
    if injection > scan_start:
        ctx.note(f"injection {(injection - scan_start).total_seconds():.0f} s after acquisition start")

    # ---- reference time ---------------------------------------------------------------------
    ge_dt: datetime.datetime | None = None
    try:
        ge_dt, _ = _parse_datetime(_text(_get(first, TAG_GE_SCAN_DATETIME)))
    except ValueError:
        ctx.note("GE private scan date-time (0009,100D) present but unreadable; ignored")
    if decay == "ADMIN":
        reference = injection
    elif decay == "NONE":
        reference = scan_start
        ctx.note("DecayCorrection NONE: every slice decay-corrected to the acquisition start with "
                 "its AcquisitionTime and ActualFrameDuration")
    else:  # START, QIBA order
        if series_dt is not None and (not known_acq or series_dt <= min(known_acq)):
            reference = series_dt
            if not known_acq:
                ctx.note("reference time from SeriesDate/SeriesTime (no AcquisitionTime to check it)")
            if ge_dt is not None and abs((ge_dt - series_dt).total_seconds()) > 1.0:
                ctx.note(f"GE private scan date-time {ge_dt} differs from series time {series_dt}; "
                         "series time used (QIBA order)")
        elif ge_dt is not None:
            reference = ge_dt
            ctx.note("reference time from GE private scan datetime (0009,100D) "
                     "(series time after acquisition start or missing)")
        else:
            refs: list[datetime.datetime] = []
            for i, (ds, t_acq) in enumerate(zip(datasets, acq)):
                if t_acq is None:
                    raise ctx.error(f"AcquisitionTime (0008,0032) missing on slice {i}; needed to "
                                    "back-compute the decay-correction reference time")
                dur_s, ref_s = _frame_timing(ctx, ds, i, need_reference=True)
                assert ref_s is not None
                t_ave = average_count_rate_time_s(dur_s, half_life)
                refs.append(t_acq + datetime.timedelta(seconds=t_ave - ref_s))
            r0 = min(refs)
            offsets = [(r - r0).total_seconds() for r in refs]
            if max(offsets) > _REFERENCE_SPREAD_LIMIT_S:
                raise ctx.error(f"back-computed decay-correction reference times spread over "
                                f"{max(offsets):.0f} s across slices")
            reference = r0 + datetime.timedelta(seconds=float(np.mean(offsets)))
            why = "series time after acquisition start" if series_dt is not None else "SeriesTime missing"
            ctx.note(f"reference time back-computed from AcquisitionTime, FrameReferenceTime and "
                     f"ActualFrameDuration ({why})")
    if (injection - reference) > _INJECTION_AFTER_SCAN_TOLERANCE:
        raise ctx.error(f"decay-correction reference time {reference} is before the injection {injection}")
    dose_ref = dose_bq * math.exp(-lam * (reference - injection).total_seconds())

    # ---- units -> Bq/mL -------------------------------------------------------------------
    def per_slice_private(tag: BaseTag, label: str) -> list[float | None]:
        out: list[float | None] = []
        for ds in datasets:
            try:
                v = _number(_get(ds, tag))
            except ValueError as exc:
                raise ctx.error(f"{label} cannot be read ({exc})") from None
            out.append(v if v not in (None, 0.0) else None)
        return out

    back_weight_kg = header_weight if header_weight is not None else weight_kg
    suv_stored: Array | None = None  # SUVbw as stored (for SUV-type units)
    if units == "BQML":
        conc = values
    elif units == "CNTS":
        acsf = per_slice_private(TAG_PHILIPS_ACTIVITY_SCALE, "Philips activity concentration scale factor (7053,1009)")
        suvsf = per_slice_private(TAG_PHILIPS_SUV_SCALE, "Philips SUV scale factor (7053,1000)")
        if all(v is not None for v in acsf):
            conc = values * np.asarray(acsf, dtype=float)[:, None, None]
            ctx.note("Units CNTS converted with Philips activity concentration scale factor (7053,1009)")
        elif all(v is not None for v in suvsf):
            suv_stored = values * np.asarray(suvsf, dtype=float)[:, None, None]
            ctx.note("Units CNTS converted with Philips SUV scale factor (7053,1000) to SUVbw")
        else:
            raise ctx.error("Units CNTS without a non-zero Philips activity concentration scale factor "
                            "(7053,1009) or SUV scale factor (7053,1000) on every slice")
    elif units == "GML":
        st = suv_type or "BW"
        if not suv_type:
            ctx.note("Units GML with empty SUVType taken as body-weight SUV")
        if st == "BW":
            norm_kg = back_weight_kg
        else:
            if height_m is None and st != "BSA":
                raise ctx.error(f"Units GML with SUVType {st} needs PatientSize (0010,1020), which is "
                                "missing or invalid")
            if sex is None:
                raise ctx.error(f"Units GML with SUVType {st} needs PatientSex (0010,0040) M, F or O, "
                                f"got {sex_raw or 'nothing'}")
            assert height_m is not None
            try:
                if st == "LBM":
                    norm_kg = lbm_morgan_kg(back_weight_kg, height_m, sex)
                elif st == "LBMJAMES128":
                    norm_kg = lbm_james_kg(back_weight_kg, height_m, sex)
                elif st == "LBMJANMA":
                    norm_kg = lbm_janmahasatian_kg(back_weight_kg, height_m, sex)
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
        suv_stored = values * (back_weight_kg / norm_kg)
    elif units == "CM2ML":
        if suv_type not in ("", "BSA"):
            raise ctx.error(f"Units CM2ML with SUVType {suv_type!r}; expected BSA")
        if height_m is None:
            raise ctx.error("Units CM2ML needs PatientSize (0010,1020), which is missing or invalid")
        bsa_cm2 = bsa_dubois_m2(back_weight_kg, height_m) * 1.0e4
        suv_stored = values * (back_weight_kg * 1000.0 / bsa_cm2)
        ctx.note(f"Units CM2ML (SUV-BSA, Du Bois {bsa_cm2 / 1e4:.4f} m²) converted to SUVbw")
    else:
        raise ctx.error(f"Units {units!r} cannot be converted to activity concentration "
                        "(supported: BQML, GML, CM2ML, CNTS with Philips scale factors)")

    if suv_stored is not None:
        if decay == "NONE":
            raise ctx.error(f"Units {units} (an SUV) with DecayCorrection NONE is ambiguous")
        if header_weight is None:
            ctx.note("PatientWeight missing: stored SUV converted back with the override weight")
        bqml = suv_stored * (dose_ref / (back_weight_kg * 1000.0))
    elif decay == "NONE":
        factors = np.empty(len(datasets))
        for i, (ds, t_acq) in enumerate(zip(datasets, acq)):
            if t_acq is None:
                raise ctx.error(f"AcquisitionTime (0008,0032) missing on slice {i}; needed for "
                                "DecayCorrection NONE")
            dur_s, _ = _frame_timing(ctx, ds, i, need_reference=False)
            factors[i] = _frame_decay_factor(dur_s, half_life) * math.exp(
                lam * (t_acq - reference).total_seconds())
        bqml = conc * factors[:, None, None]
    else:
        bqml = conc
    bqml = np.ascontiguousarray(bqml, dtype=np.float64)

    # ---- SUV factors ------------------------------------------------------------------------
    suv_bw_factor = weight_kg * 1000.0 / dose_ref
    suvbw = bqml * suv_bw_factor
    sul_james = sul_janma = suv_bsa = None
    if height_m is not None:
        suv_bsa = bsa_dubois_m2(weight_kg, height_m) * 1.0e4 / dose_ref
        if sex in ("M", "F"):
            try:
                sul_james = lbm_james_kg(weight_kg, height_m, sex) * 1000.0 / dose_ref
            except ValueError:
                ctx.note("James lean body mass not positive for this weight and height; SUL (James) unset")
            sul_janma = lbm_janmahasatian_kg(weight_kg, height_m, sex) * 1000.0 / dose_ref

    return PetConversion(
        bqml=bqml,
        suvbw=suvbw,
        suv_bw_factor=float(suv_bw_factor),
        reference_time=reference,
        injection_time=injection,
        injected_activity_bq=float(dose_bq),
        half_life_s=float(half_life),
        weight_kg=float(weight_kg),
        height_m=None if height_m is None else float(height_m),
        sex=sex,
        units_in=units,
        decay_correction=decay,
        radionuclide=nuclide_name,
        sul_james_factor=sul_james,
        sul_janmahasatian_factor=sul_janma,
        suv_bsa_factor=suv_bsa,
        notes=tuple(ctx.notes),
        scan_start=scan_start,
        header_weight_kg=None if header_weight is None else float(header_weight),
    )
