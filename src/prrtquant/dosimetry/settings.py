"""The dosimetry stage's settings (frozen, validated) and their reading from the config."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from .tac import MODELS

__all__ = ["DosimetrySettings", "settings_from_config"]

Array = np.ndarray

# --------------------------------------------------------------------------- settings

@dataclass(frozen=True)
class DosimetrySettings:
    """Every tunable of the dosimetry stage, with defaults (config section ``dosimetry``).

    Attributes
    ----------
    models
        TAC models tried when a cycle has ≥ 3 time points: any of ``mono``, ``bi``,
        ``uptake_washout``, ``tri`` (see :data:`MODELS`).
    activity_cv
        Relative standard uncertainty of one measured activity, random between time points (counting
        statistics, reconstruction, VOI placement): weights of the fit, σ_i = cv·A_i, propagated through
        the fit by parametric bootstrap.
    calibration_cv
        Relative standard uncertainty of the SPECT calibration factor (Bq per count rate). Systematic: the
        same at every time point and cycle of a camera, so it scales a whole TAC (added in quadrature to a
        cycle's TIA, *linearly* over cycles in the cumulative rows), as in the EANM practical guidance on
        uncertainty analysis (Gear et al., EJNMMI 45 (2018) 2456–2474). Set it from your calibration.
    voi_boundary_sd_mm
        Standard uncertainty of the VOI boundary (delineation plus registration), as a shift of the
        surface of the volume-equivalent sphere: u(V)/V = 3·u_r/r (Gear et al. 2018). It enters the
        activity through the recovery coefficient (when partial-volume correction is on) and the S-value
        dose through the mass; the voxel doses average the dose map over the VOI and do not carry it.
    fixed_voi
        True: every time point's activity is measured with the partial-volume (fractional) propagation of
        the one drawn VOI, the same physical volume at every time point (within about 1 % on the bundled
        cohort) whatever the SPECT grid. False: the region definition of quantification
        (``quantify.mask_kind``), the same voxels as ``cycles.tsv``.
    voi_volume_tolerance
        A region whose VOI volume at a time point differs from the cycle's median volume by more than this
        fraction is flagged (``voi_flag`` in ``tac.tsv``, ``flags`` in ``dosimetry.tsv``).
    max_tail_fraction
        A fit whose extrapolated TIA after the last time point exceeds this fraction of its total TIA
        is flagged unphysical.
    uncertainty_samples
        Parametric-bootstrap refits per fit for the TIA uncertainty.
    trapezoid_start
        Area before the first point in the trapezoid method: ``zero`` (linear uptake from A(0) = 0) or
        ``constant`` (A(0) = A(t1), conservative).
    stp_method
        Single-time-point method for cycles with one time point: ``madsen`` or ``hanscheid``.
    stp_use_prior_cycle
        Madsen: use the region's effective half-life fitted in an earlier cycle of the patient when
        there is one; otherwise the population value.
    population_effective_half_life_h
        Madsen: population effective half-lives (h) per region class (``kidney``, ``spleen``,
        ``liver``, ``bone_marrow``, ``lesion``, ``other``). Defaults are typical 177Lu-DOTATATE values of
        the order reported e.g. by Sandström et al., J Nucl Med 54 (2013) 33–41; use your site's.
    stp_half_life_cv
        Relative uncertainty of the population half-life (propagated to the Madsen TIA).
    stp_prior_cycle_half_life_cv
        Relative change of a patient's effective half-life between cycles (an assumption: set it from your
        site's repeated measurements), combined with the prior cycle's own fit uncertainty of T_eff.
    stp_agreement
        Single time point: when Hänscheid's TIA differs from Madsen's by more than this fraction, the row
        is flagged (the two assume different kinetics; the trapezoid + physical tail is an upper bound,
        no biological clearance, and is not compared).
    density
        ``ct`` (bilinear HU → density calibration of the session's CT) or ``water`` (1 g/mL).
    ct_density_slope_per_hu
        Slope (g/mL per HU) above 0 HU of the bilinear calibration (below: 1 + HU/1000).
    min_density_g_ml
        Lower clip of the density (air voxels would otherwise give unbounded dose).
    kernel_radius_mm
        Extent of the voxel S kernel (the photon energy deposited farther away is not counted).
    kernel_photons
        Include the photon component in the voxel S kernel and the sphere/organ S-values.
    electron_mean_range_mm
        Mean of the exponential radial energy-deposition density of the electron point kernel.
    kernel_samples
        Monte-Carlo samples per kernel component (deterministic seed).
    dose_map_hours
        Voxel TIA map = activity map of the cycle's time point closest to this time × per-region
        TIA / activity at that point.
    alpha_beta_gy, repair_half_time_h
        Kidney LQ parameters for the BED.
    kidney_limit_gy, bone_marrow_limit_gy, kidney_bed_limit_gy
        Cumulative limits, compared and flagged (never a decision). ``kidney_bed_limit_gy`` may be
        None (no BED comparison).
    recovery_coefficients
        Optional partial-volume correction: recovery coefficients measured on a sphere phantom with the
        site's SPECT protocol, ``[[volume_ml, rc], ...]``, applied to lesions and extrahepatic lesions
        (activity / RC(V) with V the VOI volume); None = no correction (said in every table).
    recovery_fit
        ``sigmoid``: RC(V) = RC_max / (1 + (V50/V)^s) fitted to the table (needs ≥ 3 rows; smooth between
        the measured spheres); ``interpolate``: linear in log volume. Both are held constant outside the
        table's volume range (no extrapolation: a VOI smaller than the smallest sphere gets its RC).
    dvh_bin_gy
        Width of the dose bins of the cumulative DVH.
    rtdose
        Also write every dose map as DICOM RTDOSE.
    plots
        Write TAC plots.
    """

    models: tuple[str, ...] = ("mono", "bi", "uptake_washout", "tri")
    activity_cv: float = 0.05
    calibration_cv: float = 0.05
    voi_boundary_sd_mm: float = 1.0
    fixed_voi: bool = True
    voi_volume_tolerance: float = 0.05
    max_tail_fraction: float = 0.8
    uncertainty_samples: int = 64
    trapezoid_start: str = "zero"
    stp_method: str = "madsen"
    stp_use_prior_cycle: bool = True
    population_effective_half_life_h: Mapping[str, float] = field(default_factory=lambda: {
        "kidney": 50.0, "spleen": 70.0, "liver": 70.0, "bone_marrow": 40.0, "lesion": 90.0, "other": 50.0})
    stp_half_life_cv: float = 0.2
    stp_prior_cycle_half_life_cv: float = 0.1
    stp_agreement: float = 0.25
    density: str = "ct"
    ct_density_slope_per_hu: float = 0.0006
    min_density_g_ml: float = 0.05
    kernel_radius_mm: float = 25.0
    kernel_photons: bool = True
    electron_mean_range_mm: float = 0.25
    kernel_samples: int = 400_000
    dose_map_hours: float = 24.0
    alpha_beta_gy: float = 2.6
    repair_half_time_h: float = 2.8
    kidney_limit_gy: float = 23.0
    bone_marrow_limit_gy: float = 2.0
    kidney_bed_limit_gy: float | None = 40.0
    recovery_coefficients: tuple[tuple[float, float], ...] | None = None
    recovery_fit: str = "sigmoid"
    dvh_bin_gy: float = 0.1
    rtdose: bool = True
    plots: bool = True

    def __post_init__(self) -> None:
        bad = [m for m in self.models if m not in MODELS]
        if bad or not self.models:
            raise ValueError(f"dosimetry.models: unknown model(s) {bad}; known: {sorted(MODELS)}")
        for name, allowed in (("trapezoid_start", ("zero", "constant")), ("stp_method", ("madsen", "hanscheid")),
                              ("density", ("ct", "water")), ("recovery_fit", ("sigmoid", "interpolate"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"dosimetry.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("calibration_cv", "voi_boundary_sd_mm", "stp_prior_cycle_half_life_cv"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and v >= 0 and math.isfinite(v)):
                raise ValueError(f"dosimetry.{name} must be a number >= 0, got {v!r}")
        for name in ("activity_cv", "max_tail_fraction", "voi_volume_tolerance", "stp_agreement", "kernel_radius_mm", "electron_mean_range_mm",
                     "alpha_beta_gy", "repair_half_time_h", "dvh_bin_gy", "min_density_g_ml"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and v > 0 and math.isfinite(v)):
                raise ValueError(f"dosimetry.{name} must be a positive number, got {v!r}")
        if self.recovery_coefficients is not None:
            rc = np.asarray(self.recovery_coefficients, dtype=float)
            if rc.ndim != 2 or rc.shape[1] != 2 or len(rc) < 2 or (rc <= 0).any() or np.any(np.diff(rc[:, 0]) <= 0):
                raise ValueError("dosimetry.recovery_coefficients must be [[volume_ml, rc], ...] with >= 2 rows, "
                                 "positive values and increasing volumes")
            if self.recovery_fit == "sigmoid" and len(rc) < 3:
                raise ValueError("dosimetry.recovery_coefficients: the sigmoid fit needs >= 3 sphere measurements "
                                 "(or recovery_fit: interpolate)")


def settings_from_config(cfg: Mapping[str, Any] | None) -> DosimetrySettings:
    """Build :class:`DosimetrySettings` from the config's ``dosimetry`` section.

    Raises
    ------
    ValueError
        Naming unknown keys (or invalid values).
    """
    cfg = dict(cfg or {})
    known = {f.name for f in fields(DosimetrySettings)}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ValueError(f"dosimetry: unknown setting(s) {unknown}; known: {sorted(known)}")
    if "models" in cfg:
        cfg["models"] = tuple(cfg["models"])
    if cfg.get("recovery_coefficients") is not None:
        cfg["recovery_coefficients"] = tuple(tuple(float(v) for v in r) for r in cfg["recovery_coefficients"])
    if "population_effective_half_life_h" in cfg:
        merged = dict(DosimetrySettings().population_effective_half_life_h)
        merged.update({str(k): float(v) for k, v in cfg["population_effective_half_life_h"].items()})
        cfg["population_effective_half_life_h"] = merged
    return DosimetrySettings(**cfg)


