"""Partial-volume recovery RC(V) and the relative uncertainty of a VOI's volume."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import optimize

__all__ = ["RecoveryCurve", "combine_relative", "volume_relative_sd", "recovery_coefficient"]

Array = np.ndarray

# --------------------------------------------------------------------------- recovery, TIA map, DVH

def recovery_coefficient(volume_ml: float, table: Sequence[Sequence[float]]) -> float:
    """RC for ``volume_ml`` from a ``[[volume_ml, rc], ...]`` table, linear in log(volume), clipped to the
    table's ends."""
    t = np.asarray(table, dtype=float)
    return float(np.interp(math.log(max(volume_ml, 1e-12)), np.log(t[:, 0]), t[:, 1]))


def _sigmoid_rc(v: Array | float, rc_max: float, v50: float, slope: float) -> Array:
    return rc_max / (1.0 + (v50 / np.asarray(v, dtype=float)) ** slope)


@dataclass(frozen=True)
class RecoveryCurve:
    """Recovery coefficient versus VOI volume from sphere-phantom measurements (partial-volume correction).

    ``sigmoid``: RC(V) = RC_max / (1 + (V50/V)^s), least squares on the table (the usual shape of sphere
    recovery curves: RC → RC_max for large volumes, → 0 as the sphere shrinks below the resolution);
    ``interpolate``: linear in log volume. Both hold the end values outside the table's volumes (a VOI
    below the smallest sphere is not divided by an extrapolated, ever smaller RC). ``residual_sd`` is the standard
    deviation of the table's RCs about the curve (0 for interpolation), a relative uncertainty of RC.
    """

    table: tuple[tuple[float, float], ...]
    method: str = "sigmoid"
    params: tuple[float, ...] = ()
    residual_sd: float = 0.0

    @classmethod
    def fit(cls, table: Sequence[Sequence[float]], method: str = "sigmoid") -> "RecoveryCurve":
        """Fit (or prepare the interpolation of) ``table`` = ``[[volume_ml, rc], ...]``."""
        t = np.asarray(table, dtype=float)
        tab = tuple((float(v), float(r)) for v, r in t)
        if method == "interpolate":
            return cls(tab, method)
        if method != "sigmoid":
            raise ValueError(f"recovery_fit must be sigmoid or interpolate, got {method!r}")
        v, rc = t[:, 0], t[:, 1]
        p0 = [min(float(rc.max()) * 1.05, 1.99), float(np.interp(0.5 * rc.max(), rc, v)), 1.0]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                p, _ = optimize.curve_fit(_sigmoid_rc, v, rc, p0=p0, bounds=([1e-3, 1e-6, 0.1], [2.0, 1e6, 10.0]),
                                          max_nfev=10000)
        except (RuntimeError, ValueError) as exc:
            raise ValueError(f"dosimetry.recovery_coefficients: the sigmoid RC(V) does not fit the table ({exc}); "
                             "use recovery_fit: interpolate") from exc
        res = rc - _sigmoid_rc(v, *p)
        sd = float(np.sqrt(np.sum((res / rc) ** 2) / max(len(rc) - 3, 1))) if len(rc) > 3 else 0.0
        return cls(tab, method, tuple(float(x) for x in p), sd)

    def __call__(self, volume_ml: float) -> float:
        if self.method == "interpolate":
            return recovery_coefficient(volume_ml, self.table)
        lo, hi = self.table[0][0], self.table[-1][0]
        return float(_sigmoid_rc(min(max(volume_ml, lo), hi), *self.params))

    def log_slope(self, volume_ml: float) -> float:
        """d ln RC / d ln V at ``volume_ml`` (how a relative volume error becomes a relative RC error)."""
        h = 1e-4
        lo, hi = self(volume_ml * math.exp(-h)), self(volume_ml * math.exp(h))
        return (math.log(hi) - math.log(lo)) / (2 * h) if lo > 0 and hi > 0 else 0.0

    def describe(self) -> str:
        """One line for tables and summaries."""
        if self.method == "interpolate":
            return f"RC interpolated in log volume over {len(self.table)} sphere measurements"
        rc_max, v50, slope = self.params
        return (f"RC = {rc_max:.3f} / (1 + ({v50:.3g} mL / V)^{slope:.3f}), fitted to {len(self.table)} sphere "
                "measurements")


def volume_relative_sd(volume_ml: float, boundary_sd_mm: float) -> float:
    """u(V)/V = 3·u_r/r of a VOI whose surface is uncertain by ``boundary_sd_mm`` (volume-equivalent sphere
    of radius r; Gear et al., EJNMMI 45 (2018) 2456–2474)."""
    if not (volume_ml > 0):
        return math.nan
    r_mm = (3.0 * volume_ml * 1000.0 / (4.0 * math.pi)) ** (1.0 / 3.0)
    return 3.0 * boundary_sd_mm / r_mm


def combine_relative(*parts: float) -> float:
    """Root sum of squares of independent relative uncertainties; NaN when any part is unknown (NaN)
    (pass 0 for a part that does not apply)."""
    if not all(math.isfinite(p) for p in parts):
        return math.nan
    return math.sqrt(sum(p * p for p in parts))


