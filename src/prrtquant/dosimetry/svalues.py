"""Sphere and organ S-values of 177Lu (self-dose of uniformly filled unit-density spheres)."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from .constants import _KEV_J, ELECTRON_KEV_PER_DECAY, ELECTRON_MAX_RANGE_MM, PHOTON_LINES
from .kernels import _photon_radial_density

__all__ = [
    "ORGAN_REFERENCE_MASS_G", "ORGAN_S_TABLE", "SPHERE_S_TABLE", "organ_s_value", "sphere_absorbed_fractions",
    "sphere_s_value",
]

Array = np.ndarray

# --------------------------------------------------------------------------- spheres and organ S-values

def _sphere_geometry(r: Array, radius: float) -> Array:
    """Probability that a point uniform in a sphere of ``radius`` displaced by r in a random direction stays
    inside: 1 − 3r/(4R) + r³/(16R³) for r ≤ 2R, else 0 (overlap of two spheres)."""
    x = np.asarray(r, dtype=float) / radius
    return np.where(x <= 2.0, 1.0 - 0.75 * x + x ** 3 / 16.0, 0.0)


def sphere_absorbed_fractions(mass_g: float, electron_mean_range_mm: float = 0.25,
                              electron_max_range_mm: float = ELECTRON_MAX_RANGE_MM) -> tuple[float, Array]:
    """Self-absorbed fractions of a uniformly filled unit-density water sphere of ``mass_g``.

    Returns (φ_electrons, φ_photons per line of :data:`PHOTON_LINES`), from the radial point kernels of
    :func:`lu177_voxel_kernel` and the exact sphere geometry factor: φ = ∫ p(r)·G(r; R) dr.
    """
    radius = (3.0 * mass_g * 1000.0 / (4.0 * math.pi)) ** (1.0 / 3.0)  # mm, 1 g = 1000 mm³
    r = np.linspace(0.0, electron_max_range_mm, 4001)
    pe = np.exp(-r / electron_mean_range_mm)
    pe /= np.trapezoid(pe, r)
    phi_e = float(np.trapezoid(pe * _sphere_geometry(r, radius), r))
    rg = np.linspace(0.0, 2.0 * radius, 8001)
    phi_g = np.array([float(np.trapezoid(_photon_radial_density(rg, e) * _sphere_geometry(rg, radius), rg))
                      for e, _ in PHOTON_LINES])
    return phi_e, phi_g


def _sphere_s_exact(mass_g: float, photons: bool = True) -> float:
    phi_e, phi_g = sphere_absorbed_fractions(mass_g)
    e_kev = ELECTRON_KEV_PER_DECAY * phi_e
    if photons:
        e_kev += sum(y * e * f for (e, y), f in zip(PHOTON_LINES, phi_g))
    return e_kev * _KEV_J * 3.6e9 / (mass_g / 1000.0)  # Gy per MBq·h


#: Sphere model table: unit-density sphere mass (g) → self-dose S value (Gy/(MBq·h)), electrons + photons.
SPHERE_S_TABLE: tuple[tuple[float, float], ...] = tuple(
    (m, _sphere_s_exact(m)) for m in (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0, 3000.0))


def sphere_s_value(mass_g: float) -> float:
    """Self-dose S value (Gy/(MBq·h)) of a 177Lu-filled sphere of ``mass_g`` (lesion sphere model).

    Log–log interpolation in :data:`SPHERE_S_TABLE` (0.01 g – 3 kg); outside the table, electron
    mass scaling S ∝ 1/m from the nearest end (electrons dominate: 1.5–8 % photon share).
    """
    if not (mass_g > 0 and math.isfinite(mass_g)):
        raise ValueError(f"sphere mass must be a positive number of g, got {mass_g!r}")
    ms = np.log([m for m, _ in SPHERE_S_TABLE])
    ss = np.log([s for _, s in SPHERE_S_TABLE])
    x = math.log(mass_g)
    if x < ms[0]:
        return float(math.exp(ss[0] + ms[0] - x))
    if x > ms[-1]:
        return float(math.exp(ss[-1] + ms[-1] - x))
    return float(math.exp(np.interp(x, ms, ss)))


#: Reference masses (g), ICRP Publication 89 adult male: kidneys (each: half of 310 g), spleen, liver,
#: red marrow.
ORGAN_REFERENCE_MASS_G: dict[str, float] = {"kidney": 155.0, "spleen": 150.0, "liver": 1800.0, "bone_marrow": 1170.0}
#: Self-dose S values (Gy/(MBq·h)) at the reference masses, sphere model of this module (not OLINDA:
#: OLINDA's 177Lu self-dose S values are electron-dominated in the same way, S ≈ 0.0853 mGy·kg/(MBq·h) /
#: mass + a few % photons, and may replace these through :func:`organ_s_value`'s ``table``).
ORGAN_S_TABLE: dict[str, float] = {k: _sphere_s_exact(m) for k, m in ORGAN_REFERENCE_MASS_G.items()}


def organ_s_value(organ: str, mass_g: float, table: Mapping[str, float] | None = None,
                  reference_mass_g: Mapping[str, float] | None = None) -> float:
    """Mass-scaled self-dose S value (Gy/(MBq·h)): S_ref × m_ref / m (MIRD/OLINDA mass scaling, exact for
    the absorbed electron energy). ``organ`` in ``kidney``, ``spleen``, ``liver``, ``bone_marrow``."""
    table = table or ORGAN_S_TABLE
    ref = reference_mass_g or ORGAN_REFERENCE_MASS_G
    if organ not in table:
        raise KeyError(f"no S value for {organ!r}; known: {sorted(table)}")
    if not (mass_g > 0 and math.isfinite(mass_g)):
        raise ValueError(f"organ mass must be a positive number of g, got {mass_g!r}")
    return float(table[organ] * ref[organ] / mass_g)


