"""Lobar design: T/N per liver lobe, lesion-to-lobe assignment and the paired treated-vs-control comparison."""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import SimpleITK as sitk
from scipy import stats

from .regions import QuantifyError, _weights, check_same_grid

__all__ = ["lobe_tn", "assign_lobe", "paired_lobe_comparison"]

Array = np.ndarray

# --------------------------------------------------------------------------- lobar T/N (LUTIA)

def lobe_tn(lesion_means: Mapping[str, float], lesion_voxels: Mapping[str, float],
            lesion_lobe: Mapping[str, str],
            healthy_lobe_mean: Mapping[str, float], treated_lobe: str | None,
            control_lobe: str | None = None) -> dict[str, Any]:
    """Tumour-to-non-tumour activity-concentration ratio per liver lobe.

    Parameters
    ----------
    lesion_means : mapping
        Lesion → mean activity concentration (e.g. Bq/mL).
    lesion_voxels : mapping
        Lesion → voxel count (or weight sum) of its mask; lesion masks are assumed disjoint, so the mean
        over the union of a lobe's lesion voxels is the voxel-weighted mean of the lesion means.
    lesion_lobe : mapping
        Lesion → lobe name (e.g. from :func:`assign_lobe`). Only lesions listed here are used.
    healthy_lobe_mean : mapping
        Lobe → mean concentration of the lobe's healthy liver (N, same unit); defines the lobes reported.
    treated_lobe : str or None
        The IA-treated lobe (lobar design); None for no comparison.
    control_lobe : str, optional
        The control lobe; default the only other lobe of ``healthy_lobe_mean``.

    Returns
    -------
    dict
        ``lobes``: lobe → {``lesions``, ``t`` (union mean, None without lesions), ``n``, ``tn`` (None
        without lesions), ``tn_per_lesion`` (lesion mean / N), ``t_voxels``, ``note``};
        ``treated_lobe``, ``control_lobe``, ``treated_over_control`` (T/N treated ÷ T/N control, None if
        either is None or no treated lobe given) and ``notes``.
    """
    notes: list[str] = []
    for lobe, n in healthy_lobe_mean.items():
        if not (math.isfinite(float(n)) and float(n) > 0.0):
            raise QuantifyError(f"healthy-liver mean of lobe {lobe!r} must be positive, got {n!r}")
    by_lobe: dict[str, list[str]] = {lobe: [] for lobe in healthy_lobe_mean}
    for lesion, lobe in lesion_lobe.items():
        if lobe not in by_lobe:
            raise QuantifyError(f"lesion {lesion!r} is in lobe {lobe!r}, which has no healthy-liver mean "
                                f"(lobes: {sorted(healthy_lobe_mean)})")
        if lesion not in lesion_means or lesion not in lesion_voxels:
            raise QuantifyError(f"lesion {lesion!r} lacks a mean or a voxel count")
        by_lobe[lobe].append(lesion)
    lobes: dict[str, Any] = {}
    for lobe, les in by_lobe.items():
        n = float(healthy_lobe_mean[lobe])
        entry: dict[str, Any] = {"lesions": list(les), "n": n, "tn_per_lesion": {}, "note": None}
        if les:
            v = np.array([float(lesion_voxels[l]) for l in les])
            if (v <= 0).any() or not np.isfinite(v).all():
                raise QuantifyError(f"lesion voxel counts must be positive: {dict(zip(les, v.tolist()))}")
            mu = np.array([float(lesion_means[l]) for l in les])
            t = math.fsum((v * mu).tolist()) / math.fsum(v.tolist())
            entry.update(t=t, tn=t / n, t_voxels=float(v.sum()),
                         tn_per_lesion={l: float(lesion_means[l]) / n for l in les})
        else:
            entry.update(t=None, tn=None, t_voxels=0.0,
                         note=f"no lesions in lobe {lobe!r}: T and T/N undefined")
            notes.append(entry["note"])
        lobes[lobe] = entry
    ratio = None
    if treated_lobe is not None:
        if treated_lobe not in lobes:
            raise QuantifyError(f"treated lobe {treated_lobe!r} not among lobes {sorted(lobes)}")
        if control_lobe is None:
            others = [l for l in lobes if l != treated_lobe]
            if len(others) != 1:
                raise QuantifyError(f"cannot infer the control lobe among {others}; pass control_lobe")
            control_lobe = others[0]
        elif control_lobe not in lobes:
            raise QuantifyError(f"control lobe {control_lobe!r} not among lobes {sorted(lobes)}")
        a, b = lobes[treated_lobe]["tn"], lobes[control_lobe]["tn"]
        if a is None or b is None:
            notes.append("treated/control T/N ratio undefined: a lobe has no lesions")
        else:
            ratio = a / b
    else:
        control_lobe = None
    return {"lobes": lobes, "treated_lobe": treated_lobe, "control_lobe": control_lobe,
            "treated_over_control": ratio, "notes": notes}


def assign_lobe(lesion_mask: sitk.Image, left_lobe_mask: sitk.Image, right_lobe_mask: sitk.Image
                ) -> tuple[str, float]:
    """Lobe holding the majority of a lesion.

    Parameters
    ----------
    lesion_mask, left_lobe_mask, right_lobe_mask : SimpleITK.Image
        Masks on one grid (binary or fractional).

    Returns
    -------
    lobe : {"left", "right"}
        The lobe with the larger overlap Σ w_lesion·w_lobe (an exact tie goes to ``left``).
    fraction : float
        Overlap with the chosen lobe / Σ w_lesion (lesion voxels outside both lobes count in the
        denominator).

    Raises
    ------
    QuantifyError
        Grid mismatch, empty lesion, or a lesion that overlaps neither lobe.
    """
    check_same_grid(lesion_mask, left_lobe_mask, "left lobe mask")
    check_same_grid(lesion_mask, right_lobe_mask, "right lobe mask")
    w = _weights(lesion_mask, "lesion mask")
    total = float(w.sum())
    if total <= 0.0:
        raise QuantifyError("lesion mask is empty")
    left = float((w * _weights(left_lobe_mask, "left lobe mask")).sum())
    right = float((w * _weights(right_lobe_mask, "right lobe mask")).sum())
    if left <= 0.0 and right <= 0.0:
        raise QuantifyError("lesion overlaps neither lobe mask")
    return ("left", left / total) if left >= right else ("right", right / total)


def paired_lobe_comparison(tn_treated: Sequence[float], tn_control: Sequence[float],
                           confidence: float = 0.95) -> dict[str, Any]:
    """LUTIA-style paired comparison of T/N between the treated and the control lobe across patients.

    Works on d = log(T/N treated) − log(T/N control) per patient.

    Parameters
    ----------
    tn_treated, tn_control : sequence of float
        Paired positive T/N ratios (dimensionless), one pair per patient.
    confidence : float
        Level of the confidence interval (0.95).

    Returns
    -------
    dict
        ``n``; ``gmr`` = exp(mean d) (geometric mean ratio, treated/control); ``ci_low``, ``ci_high`` =
        exp of the t-distribution interval of mean d (df n − 1, scale SD(d)/√n); ``mean_log_ratio``,
        ``sd_log_ratio``; ``t_statistic`` and ``p_ttest`` (:func:`scipy.stats.ttest_rel` on the logs,
        two-sided); ``p_wilcoxon`` (:func:`scipy.stats.wilcoxon` signed-rank, two-sided, exact when n <= 50
        without zero or tied differences, else asymptotic) and ``wilcoxon_method``; ``n_increase`` and
        ``share_increase`` (patients with treated/control > 1); ``confidence``; ``notes``. With n = 1
        the inferential values are NaN.
    """
    t = np.asarray(tn_treated, dtype=float)
    c = np.asarray(tn_control, dtype=float)
    if t.shape != c.shape or t.ndim != 1:
        raise QuantifyError(f"paired T/N sequences must have equal length: {t.shape} vs {c.shape}")
    n = int(t.size)
    if n == 0:
        raise QuantifyError("paired comparison needs at least one patient")
    if not (np.isfinite(t).all() and np.isfinite(c).all() and (t > 0).all() and (c > 0).all()):
        raise QuantifyError("T/N ratios must be finite and positive for a log-scale comparison")
    if not 0.0 < confidence < 1.0:
        raise QuantifyError(f"confidence must lie in (0, 1), got {confidence!r}")
    lt, lc = np.log(t), np.log(c)
    d = lt - lc
    mean_d = float(d.mean())
    notes: list[str] = []
    res: dict[str, Any] = {"n": n, "gmr": math.exp(mean_d), "mean_log_ratio": mean_d,
                           "n_increase": int((d > 0).sum()), "share_increase": float((d > 0).sum()) / n,
                           "confidence": confidence, "notes": notes}
    nan = math.nan
    if n < 2:
        notes.append("n = 1: no confidence interval or tests")
        res.update(sd_log_ratio=nan, ci_low=nan, ci_high=nan, t_statistic=nan, p_ttest=nan, p_wilcoxon=nan,
                   wilcoxon_method=None)
        return res
    sd = float(d.std(ddof=1))
    res["sd_log_ratio"] = sd
    if sd > 0.0:
        lo, hi = stats.t.interval(confidence, n - 1, loc=mean_d, scale=sd / math.sqrt(n))
        tt = stats.ttest_rel(lt, lc)
        res.update(ci_low=math.exp(float(lo)), ci_high=math.exp(float(hi)), t_statistic=float(tt.statistic),
                   p_ttest=float(tt.pvalue))
    else:
        notes.append("all log ratios are equal: zero variance, no t-test")
        res.update(ci_low=math.exp(mean_d), ci_high=math.exp(mean_d), t_statistic=nan, p_ttest=nan)
    nz = d[d != 0.0]
    if nz.size == 0:
        notes.append("all differences are zero: no Wilcoxon test")
        res.update(p_wilcoxon=nan, wilcoxon_method=None)
    else:
        ties = np.unique(np.abs(nz)).size < nz.size
        method = "exact" if (n <= 50 and nz.size == n and not ties) else "asymptotic"
        wr = stats.wilcoxon(lt, lc, method=method)
        res.update(p_wilcoxon=float(wr.pvalue), wilcoxon_method=method)
    return res
