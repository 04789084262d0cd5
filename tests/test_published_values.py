"""The 177Lu voxel S kernel and sphere S-values against published tables (tests/data/published/SOURCES.md)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from prrtquant import dosimetry as D

DATA = Path(__file__).parent / "data" / "published"
KEV_J = 1.602176634e-16
#: β⁻ energy per 177Lu decay (keV), ICRP 107: the electrons of the Lanconelli database (SOURCES.md)
BETA_KEV = 133.3
NEIGHBOURS = [(0, 0, 0), (1, 0, 0), (1, 1, 0), (1, 1, 1)]


def _lanconelli(voxel_mm: str) -> np.ndarray:
    """The published 11³ kernel (mGy/(MBq·s)) from its stored octant."""
    octant = np.zeros((6, 6, 6))
    lines = (DATA / f"177Lu{voxel_mm}mmsoft.txt").read_text(encoding="utf-8").splitlines()[2:]
    for line in lines:
        p = line.split()
        if len(p) >= 4:
            octant[int(p[0]), int(p[1]), int(p[2])] = float(p[3])
    idx = np.abs(np.arange(-5, 6))
    return octant[np.ix_(idx, idx, idx)]


def _ours(voxel_mm: float, beta_only: bool) -> np.ndarray:
    """Our kernel as S in mGy/(MBq·s) on the same 11³ voxels (unit density); ``beta_only`` rescales the
    electron part to the β⁻ energy (the database's electrons), keeping the photon part."""
    full = D.lu177_voxel_kernel((voxel_mm,) * 3)
    electrons = D.lu177_voxel_kernel((voxel_mm,) * 3, photons=False)
    c, ce = np.array(full.shape) // 2, np.array(electrons.shape) // 2
    e = np.zeros((11, 11, 11))
    h = np.minimum(ce, 5)
    e[5 - h[0]:6 + h[0], 5 - h[1]:6 + h[1], 5 - h[2]:6 + h[2]] = electrons[
        ce[0] - h[0]:ce[0] + h[0] + 1, ce[1] - h[1]:ce[1] + h[1] + 1, ce[2] - h[2]:ce[2] + h[2] + 1]
    k = full[c[0] - 5:c[0] + 6, c[1] - 5:c[1] + 6, c[2] - 5:c[2] + 6]
    if beta_only:
        k = k - e + e * BETA_KEV / D.ELECTRON_KEV_PER_DECAY
    mass_kg = (voxel_mm / 10.0) ** 3 / 1000.0
    return k * D.ELECTRON_KEV_PER_DECAY * KEV_J * 1e6 / mass_kg * 1e3


@pytest.fixture(scope="module", params=["2.21", "3", "4.42", "4.8", "6"])
def kernels(request):
    return request.param, _lanconelli(request.param), _ours(float(request.param), False), _ours(
        float(request.param), True)


def test_voxel_kernel_against_lanconelli(kernels):
    """Same electrons (β⁻ only, as in the database): central and first-neighbour voxel S within 5 % of
    Lanconelli et al. 2012 at 2.21–6 mm (measured: central +0.5 … +1.0 %, face neighbour −3.9 … −2.9 %).
    The same kernel's energy split (shape) within 3 % / 5 % whatever the energy per decay. The edge and
    corner neighbours (under 0.1 % of the central value) are within 15 % (measured −9.6 … +0.7 %)."""
    size, pub, ours_all, ours_beta = kernels
    for off, tol in zip(NEIGHBOURS, (0.05, 0.05, 0.15, 0.15)):
        i = tuple(5 + o for o in off)
        assert ours_beta[i] == pytest.approx(pub[i], rel=tol), (size, off, ours_beta[i] / pub[i])
    shape_o, shape_p = ours_all / ours_all.sum(), pub / pub.sum()
    assert shape_o[5, 5, 5] == pytest.approx(shape_p[5, 5, 5], rel=0.03)
    assert shape_o[6, 5, 5] == pytest.approx(shape_p[6, 5, 5], rel=0.05)


def test_energy_per_decay_explains_the_absolute_offset(kernels):
    """Our kernel deposits every electron of ICRP 107 (147.9 keV per decay); the database holds the β⁻
    spectrum: the energy in the 11³ voxels is 134.7–137.5 keV published versus 149.5–150.8 keV ours, so
    the central voxel S is 11.5–12 % above the table, by design (documented in the README)."""
    size, pub, ours_all, _ = kernels
    mass_kg = (float(size) / 10.0) ** 3 / 1000.0
    e_pub = pub.sum() * mass_kg / 1e9 / KEV_J
    assert 133.3 < e_pub < 139.0
    assert ours_all[5, 5, 5] / pub[5, 5, 5] == pytest.approx(D.ELECTRON_KEV_PER_DECAY / BETA_KEV, rel=0.02)


def test_sphere_s_values_against_published_table():
    """Unit-density sphere self-dose S (ours: point kernels on the exact sphere geometry) against the 177Lu
    sphere table shipped by PyTheranostics (soft tissue, photons included): within 2 % from 0.015 g to
    932 g (measured −1.1 … −0.1 %), within 5 % at 4.3 mg (+4.5 %)."""
    table = json.loads((DATA / "spheres.json").read_text())["100%/0%"]
    for m, s in zip(table["tumor_mass"], table["total_s_value"]):
        published = s * 3.6e12 / 1e3  # Gy/(Bq·s) → Gy/(MBq·h)
        tol = 0.05 if m < 0.01 else 0.02
        assert D.sphere_s_value(m) == pytest.approx(published, rel=tol), m
