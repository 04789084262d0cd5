"""Trial endpoints on PET: enhancement ratios, the IA eligibility decision, tumour-to-liver ratios, SSTR positivity."""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from .regions import QuantifyError

__all__ = ["enhancement_ratios", "eligibility", "tumour_to_liver", "sstr_positive", "retreatment_fraction"]

Array = np.ndarray

# --------------------------------------------------------------------------- enhancement ratio (Bordeaux)

_ER_SOURCES = {"er_mean": ("suvmean", "mean"), "er_max": ("suvmax", "max"), "er_peak": ("suvpeak", "peak")}


def _stat(d: Mapping[str, float] | None, keys: tuple[str, str]) -> float:
    if d is None:
        return math.nan
    for k in keys:
        if k in d and d[k] is not None:
            return float(d[k])
    return math.nan


def _ratio(a: float, b: float) -> float:
    if not (math.isfinite(a) and math.isfinite(b)) or b <= 0.0:
        return math.nan
    return a / b


def enhancement_ratios(ia: Mapping[str, Mapping[str, float]],
                       iv: Mapping[str, Mapping[str, float]]) -> pd.DataFrame:
    """Per-lesion enhancement ratios IA / IV.

    Parameters
    ----------
    ia, iv : mapping
        Lesion name → statistics of the IA and IV PET (SUV, g/mL): keys ``suvmean``, ``suvmax`` and
        optionally ``suvpeak`` (``mean``/``max``/``peak`` are accepted too, e.g. straight from
        :func:`region_stats`).

    Returns
    -------
    pandas.DataFrame
        Indexed by lesion (IA order, then lesions only on IV) with columns ``er_mean`` =
        SUVmean(IA)/SUVmean(IV), ``er_max`` = SUVmax(IA)/SUVmax(IV), ``er_peak`` =
        SUVpeak(IA)/SUVpeak(IV) (dimensionless), and the inputs ``suvmean_ia``, ``suvmean_iv``,
        ``suvmax_ia``, ``suvmax_iv``, ``suvpeak_ia``, ``suvpeak_iv``. A ratio is NaN when a value is
        missing on either side or the IV value is not positive.
    """
    names = list(ia) + [k for k in iv if k not in ia]
    rows = []
    for name in names:
        a, b = ia.get(name), iv.get(name)
        row: dict[str, Any] = {"lesion": name}
        for er, keys in _ER_SOURCES.items():
            va, vb = _stat(a, keys), _stat(b, keys)
            row[er] = _ratio(va, vb)
            row[f"{keys[0]}_ia"], row[f"{keys[0]}_iv"] = va, vb
        rows.append(row)
    cols = ["lesion", "er_mean", "er_max", "er_peak", "suvmean_ia", "suvmean_iv", "suvmax_ia", "suvmax_iv",
            "suvpeak_ia", "suvpeak_iv"]
    return pd.DataFrame(rows, columns=cols).set_index("lesion")


def eligibility(er: pd.DataFrame, statistic: str = "er_max", threshold: float = 3.0, max_lesions: int = 5,
                qc_flags: Sequence[str] = (), lesions: Sequence[str] | None = None) -> dict[str, Any]:
    """Bordeaux-style eligibility for an IA cycle: mean enhancement ratio over target lesions ≥ threshold.

    Parameters
    ----------
    er : pandas.DataFrame
        From :func:`enhancement_ratios` (index = lesion).
    statistic : {"er_max", "er_mean", "er_peak"}
        Column averaged.
    threshold : float
        Dimensionless ER threshold (trial: 3.0); eligible when value >= threshold.
    max_lesions : int
        At most this many target lesions are used: the first ones in ``lesions`` order (default: the
        frame's row order, i.e. the order the readers chose them in), after dropping lesions whose
        ratio is not finite.
    qc_flags : sequence of str
        Quality-control flags raised upstream; any flag sets ``flagged`` (eligibility is still computed).
    lesions : sequence of str, optional
        Target lesions (e.g. the MRI-chosen ones); default every row.

    Returns
    -------
    dict
        ``statistic``, ``value`` (fsum-based mean, None when no lesion is evaluable), ``threshold``,
        ``eligible`` (bool), ``n_lesions``, ``lesions`` (used), ``excluded_lesions`` (non-finite
        ratio), ``qc_flags`` (input flags plus ``non_finite_er:<lesion>`` / ``no_evaluable_lesions``),
        ``flagged``.
    """
    if statistic not in _ER_SOURCES:
        raise QuantifyError(f"statistic must be one of {sorted(_ER_SOURCES)}, got {statistic!r}")
    if statistic not in er.columns:
        raise QuantifyError(f"enhancement-ratio table has no column {statistic!r} "
                            f"(columns {list(er.columns)})")
    if max_lesions < 1:
        raise QuantifyError(f"max_lesions must be >= 1, got {max_lesions}")
    order = list(er.index) if lesions is None else list(lesions)
    missing = [l for l in order if l not in er.index]
    if missing:
        raise QuantifyError(f"target lesions not in the enhancement-ratio table: {missing}")
    flags = [str(f) for f in qc_flags]
    used: list[str] = []
    excluded: list[str] = []
    for l in order:
        v = float(er.at[l, statistic])
        if not math.isfinite(v):
            excluded.append(l)
            flags.append(f"non_finite_er:{l}")
        elif len(used) < max_lesions:
            used.append(l)
    if used:
        value: float | None = math.fsum(float(er.at[l, statistic]) for l in used) / len(used)
        eligible = bool(value >= threshold)
    else:
        value, eligible = None, False
        flags.append("no_evaluable_lesions")
    return {"statistic": statistic, "value": value, "threshold": float(threshold), "eligible": eligible,
            "n_lesions": len(used), "lesions": used, "excluded_lesions": excluded, "qc_flags": flags,
            "flagged": bool(flags)}


# --------------------------------------------------------------------------- SSTR positivity (Krenning-like)

def _as_value(s: Mapping[str, float] | float, key: str, what: str) -> float:
    if isinstance(s, Mapping):
        if key not in s:
            raise QuantifyError(f"{what} statistics have no key {key!r} (keys {sorted(s)})")
        return float(s[key])
    return float(s)


def tumour_to_liver(lesion_stats: Mapping[str, float] | float,
                    healthy_liver_stats: Mapping[str, float] | float,
                    lesion_key: str = "mean", liver_key: str = "mean") -> float:
    """Tumour-to-liver ratio: lesion uptake / healthy-liver uptake (dimensionless).

    Parameters
    ----------
    lesion_stats, healthy_liver_stats : mapping or float
        Statistics dicts (e.g. from :func:`region_stats`) or plain values in the same unit.
    lesion_key, liver_key : str
        Keys used from dicts (default both ``mean``; e.g. ``lesion_key="max"`` for SUVmax/liver SUVmean).

    Raises
    ------
    QuantifyError
        Non-finite values or non-positive liver uptake.
    """
    t = _as_value(lesion_stats, lesion_key, "lesion")
    n = _as_value(healthy_liver_stats, liver_key, "healthy liver")
    if not (math.isfinite(t) and math.isfinite(n)):
        raise QuantifyError(f"tumour-to-liver ratio needs finite values, got lesion {t!r} and liver {n!r}")
    if n <= 0.0:
        raise QuantifyError(f"healthy-liver uptake must be positive for a tumour-to-liver ratio, got {n!r}")
    return t / n


def sstr_positive(tlr: float, threshold: float = 1.0) -> bool:
    """Krenning-like SSTR positivity: lesion uptake at least that of healthy liver (``tlr >= threshold``)."""
    if not math.isfinite(tlr):
        raise QuantifyError(f"tumour-to-liver ratio must be finite, got {tlr!r}")
    return bool(tlr >= threshold)


def retreatment_fraction(tlr_by_lesion: Mapping[str, float], threshold: float = 1.0,
                         required: float = 0.9) -> dict[str, Any]:
    """ReLUTH rule: at least ``required`` of the lesions are SSTR-positive (uptake >= healthy liver).

    Parameters
    ----------
    tlr_by_lesion : mapping
        Lesion → tumour-to-liver ratio (dimensionless).
    threshold : float
        A lesion is positive when its ratio >= threshold (1.0: as avid as liver).
    required : float
        Fraction of positive lesions required (0.9 = 90 %); ``meets_rule`` when fraction >= required
        (the fraction k/n is a correctly rounded division, so 9/10 meets 0.9).

    Returns
    -------
    dict
        ``n_lesions``, ``n_positive``, ``fraction``, ``threshold``, ``required``, ``meets_rule``,
        ``positive_lesions``, ``negative_lesions``.
    """
    if not tlr_by_lesion:
        raise QuantifyError("retreatment rule needs at least one lesion")
    pos, neg = [], []
    for name, v in tlr_by_lesion.items():
        (pos if sstr_positive(float(v), threshold) else neg).append(name)
    n = len(pos) + len(neg)
    frac = len(pos) / n
    return {"n_lesions": n, "n_positive": len(pos), "fraction": frac, "threshold": float(threshold),
            "required": float(required), "meets_rule": bool(frac >= required), "positive_lesions": pos,
            "negative_lesions": neg}


