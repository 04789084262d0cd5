"""Tissue properties, tracer kinetics and image formation for the synthetic patients.

Every number here is a *generator assumption*, chosen to look like 68Ga-DOTATATE PET and
177Lu-DOTATATE SPECT of neuroendocrine liver metastases; none is a physiological claim.
What matters for testing is that each is recorded in ``truth.json`` and that the images are
made from them exactly as documented here.

177Lu kinetics per exclusive region (t in hours after injection)::

    c(t) = A_inj / W * S * (exp(-(kw + lam) t) - exp(-(ku + lam) t))        [Bq/mL]

with A_inj in Bq, W in g, S dimensionless, ku / kw biological uptake / washout rates (1/h) and
lam the physical decay constant. Its integral from 0 to infinity is analytic::

    TIA density = A_inj / W * S * (1 / (kw + lam) - 1 / (ku + lam))       [Bq h / mL]
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

from ..geometry import Grid, Rigid
from .anatomy import Anatomy, Deformation

Array = np.ndarray

#: CT numbers (HU) per tissue.
HU = {"air": -1000.0, "fat": -95.0, "soft_tissue": 35.0, "lung": -830.0, "liver": 62.0, "spleen": 50.0,
      "kidney": 32.0, "blood": 42.0, "bone_cortical": 850.0, "bone_marrow": 230.0, "extrahepatic": 40.0,
      "lesion": 38.0}

#: T1-weighted hepatobiliary-phase-like MR signal (arbitrary units): lesions dark in bright liver.
MR_SIGNAL = {"air": 0.0, "fat": 900.0, "soft_tissue": 280.0, "lung": 20.0, "liver": 620.0, "spleen": 330.0,
             "kidney": 420.0, "blood": 150.0, "bone_cortical": 40.0, "bone_marrow": 520.0, "extrahepatic": 260.0,
             "lesion": 210.0}

#: 68Ga-DOTATATE SUV (body weight) after IV injection, per tissue, before per-patient jitter.
SUV_IV = {"air": 0.0, "fat": 0.25, "soft_tissue": 0.6, "lung": 0.4, "liver": 6.5, "spleen": 20.0, "kidney": 14.0,
          "blood": 1.6, "bone_cortical": 0.4, "bone_marrow": 1.6, "extrahepatic": 14.0, "lesion": 18.0}

#: IA/IV uptake ratio for tissues other than IA-enhanced lesions: the hepatic first pass raises the
#: treated liver a little and leaves a little less tracer for the rest of the body.
IA_RATIO_TREATED_LIVER = 1.30
IA_RATIO_SYSTEMIC = 0.88


@dataclass(frozen=True)
class Kinetics:
    """177Lu uptake–washout model of one region (see module docstring)."""

    S: float
    ku_per_h: float
    kw_per_h: float

    def concentration(self, t_h: float | Array, a_inj_bq: float, weight_g: float, lam_per_h: float) -> float | Array:
        t = np.asarray(t_h, dtype=float)
        return a_inj_bq / weight_g * self.S * (np.exp(-(self.kw_per_h + lam_per_h) * t)
                                               - np.exp(-(self.ku_per_h + lam_per_h) * t))

    def tia_density(self, a_inj_bq: float, weight_g: float, lam_per_h: float) -> float:
        """Time-integrated activity concentration from 0 to infinity (Bq·h/mL)."""
        return a_inj_bq / weight_g * self.S * (1.0 / (self.kw_per_h + lam_per_h) - 1.0 / (self.ku_per_h + lam_per_h))

    def scaled(self, gain: float) -> "Kinetics":
        return Kinetics(self.S * gain, self.ku_per_h, self.kw_per_h)

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def _k(s: float, t_up_h: float, t_wash_h: float) -> Kinetics:
    return Kinetics(s, math.log(2) / t_up_h, math.log(2) / t_wash_h)


#: 177Lu-DOTATATE kinetics after IV injection per tissue: amplitude, uptake and washout half-times.
LU_KINETICS_IV = {
    "air": Kinetics(0.0, 1.0, 1.0),
    "fat": _k(0.15, 0.3, 12.0),
    "soft_tissue": _k(0.5, 0.3, 10.0),
    "lung": _k(0.4, 0.2, 8.0),
    "blood": _k(2.5, 0.05, 4.0),
    "liver": _k(4.0, 0.7, 70.0),
    "spleen": _k(11.0, 1.4, 90.0),
    "kidney": _k(9.0, 0.3, 50.0),
    "bone_cortical": _k(0.25, 0.5, 20.0),
    "bone_marrow": _k(0.6, 0.4, 30.0),
    "extrahepatic": _k(22.0, 1.5, 110.0),
    "lesion": _k(30.0, 1.5, 120.0),
}


def fwhm_to_sigma(fwhm: float) -> float:
    return fwhm / (2.0 * math.sqrt(2.0 * math.log(2.0)))


def emission_image(anat: Anatomy, grid: Grid, value_by_label: Array, fwhm_mm: float, supersample: int,
                   pose: Rigid | None = None, deformation: Deformation | None = None) -> Array:
    """Activity concentration seen by a scanner: true map ⊛ Gaussian PSF, integrated over voxels.

    The true map is sampled on a grid ``supersample`` times finer than ``grid`` (odd factors put a
    sub-voxel centre on every voxel centre), blurred with an isotropic Gaussian of ``fwhm_mm``
    and averaged back onto ``grid``. Returns a float64 (z, y, x) array.
    """
    fine = grid.refined(supersample) if supersample > 1 else grid
    labels = anat.label_grid(fine, pose, deformation)
    vals = value_by_label[labels].astype(np.float64)
    sig = fwhm_to_sigma(fwhm_mm) / np.asarray(fine.spacing)[::-1]  # (z, y, x) order in voxels
    vals = ndimage.gaussian_filter(vals, sigma=sig, mode="nearest", truncate=4.0)
    if supersample > 1:
        nz, ny, nx = grid.shape_zyx
        s = supersample
        vals = vals.reshape(nz, s, ny, s, nx, s).mean(axis=(1, 3, 5))
    return vals


def lut(anat: Anatomy, value_by_region: dict[str, float], default: float = 0.0) -> Array:
    """Label-indexed lookup table (256 entries) from per-region values."""
    table = np.full(256, default, dtype=np.float64)
    for r in anat.regions:
        table[r.label] = value_by_region.get(r.name, default)
    return table
