"""Radiobiology: the linear-quadratic BED for an exponentially decreasing dose rate."""

from __future__ import annotations

import math

import numpy as np

__all__ = ["bed", "lq_g_factor"]

Array = np.ndarray

# --------------------------------------------------------------------------- radiobiology

def lq_g_factor(effective_half_life_h: float, repair_half_time_h: float) -> float:
    """Lea–Catcheside factor of an exponentially decreasing dose rate (instant uptake) with
    mono-exponential repair: G = λ/(μ + λ), λ = ln2/T_eff, μ = ln2/T_rep (Dale 1985)."""
    lam = math.log(2.0) / effective_half_life_h
    mu = math.log(2.0) / repair_half_time_h
    return lam / (mu + lam)


def bed(dose_gy: float, effective_half_life_h: float, alpha_beta_gy: float = 2.6,
        repair_half_time_h: float = 2.8) -> float:
    """Biologically effective dose (Gy): BED = D·(1 + G·D/(α/β)), G = :func:`lq_g_factor` (Dale, Br J
    Radiol 58 (1985) 515). Kidney defaults α/β = 2.6 Gy, T_rep = 2.8 h (Wessels et al. 2008;
    Barone et al. 2005). Cycles weeks apart add: BED_total = Σ BED_cycle. α/β → ∞ gives D."""
    if not math.isfinite(dose_gy):
        return math.nan
    if math.isinf(alpha_beta_gy):
        return float(dose_gy)
    g = lq_g_factor(effective_half_life_h, repair_half_time_h)
    return float(dose_gy * (1.0 + g * dose_gy / alpha_beta_gy))


