"""Body-size normalisations of SUV (lean body mass, ideal body weight, body surface area) and frame-timing formulas, as in the DICOM SUVType and the IBSI SUV manual."""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

__all__ = [
    "lbm_james_kg", "lbm_janmahasatian_kg", "lbm_morgan_kg", "ibw_kg", "bsa_dubois_m2",
    "average_count_rate_time_s",
]

Array = np.ndarray

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


