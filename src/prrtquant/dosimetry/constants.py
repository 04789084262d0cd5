"""177Lu decay and interaction data used by every dose calculation."""

from __future__ import annotations

import math

import numpy as np

from ..radionuclides import LU177

__all__ = [
    "ELECTRON_J_PER_MBQ_H", "ELECTRON_KEV_PER_DECAY", "LAMBDA_LU177_PER_H",
    "LOCAL_DEPOSITION_MGY_KG_PER_MBQ_H", "PHOTON_LINES",
]

Array = np.ndarray

# --------------------------------------------------------------------------- physical constants

#: Physical decay constant of 177Lu (1/h).
LAMBDA_LU177_PER_H: float = math.log(2.0) / LU177.half_life_h
_KEV_J = 1.602176634e-16
#: Mean electron energy per 177Lu decay (keV), ICRP 107.
ELECTRON_KEV_PER_DECAY: float = 147.9
#: Electron energy released per MBq·h (J): 147.9 keV × 1.602e-16 J/keV × 3.6e9 decays.
ELECTRON_J_PER_MBQ_H: float = ELECTRON_KEV_PER_DECAY * _KEV_J * 3.6e9
#: The same in mGy·kg/(MBq·h) (= mJ per MBq·h): 0.0853.
LOCAL_DEPOSITION_MGY_KG_PER_MBQ_H: float = ELECTRON_J_PER_MBQ_H * 1e3
#: 177Lu photon lines (keV, yield per decay), ICRP 107 / NNDC.
PHOTON_LINES: tuple[tuple[float, float], ...] = ((208.366, 0.1038), (112.950, 0.0620))
#: Water μ/ρ and μen/ρ (cm²/g) versus energy (keV), NIST XCOM / Hubbell & Seltzer.
_WATER_MU = ((100.0, 0.1707, 0.02546), (150.0, 0.1505, 0.02764), (200.0, 0.1370, 0.02967),
             (300.0, 0.1186, 0.03192))
#: CSDA range (mm) in water of the 498 keV β⁻ endpoint electron, NIST ESTAR.
ELECTRON_MAX_RANGE_MM: float = 1.8


def _water_coefficients(e_kev: float) -> tuple[float, float]:
    """Linear attenuation and energy-absorption coefficients of water (1/mm) at ``e_kev``."""
    e = np.log([r[0] for r in _WATER_MU])
    mu = np.exp(np.interp(math.log(e_kev), e, np.log([r[1] for r in _WATER_MU])))
    men = np.exp(np.interp(math.log(e_kev), e, np.log([r[2] for r in _WATER_MU])))
    return float(mu) / 10.0, float(men) / 10.0  # cm²/g × 1 g/cm³ → 1/cm → 1/mm


