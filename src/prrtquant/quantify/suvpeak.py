"""SUVpeak: the highest mean in a 1 mL sphere inside a region (QIBA/PERCIST)."""

from __future__ import annotations

import math

import numpy as np
import SimpleITK as sitk
from scipy import signal

from .regions import (
    EmptyRegionError,
    QuantifyError,
    _grid_text,
    _index_to_physical_matrix,
    _values,
    _weights,
    check_same_grid,
)

__all__ = ["sphere_radius_mm", "suv_peak"]

Array = np.ndarray

_PEAK_REFINE = 64
#: Upper bound on (candidates × kernel voxels) recomputed directly (ties in uniform regions).
_PEAK_REFINE_WORK = 5e6


# --------------------------------------------------------------------------- SUVpeak

def sphere_radius_mm(volume_ml: float) -> float:
    """Radius (mm) of a sphere of ``volume_ml`` mL: (3 V / 4π)^(1/3); 1 mL → 6.2035 mm."""
    if not (volume_ml > 0 and math.isfinite(volume_ml)):
        raise QuantifyError(f"sphere volume must be a positive number of mL, got {volume_ml!r}")
    return (3.0 * volume_ml * 1000.0 / (4.0 * math.pi)) ** (1.0 / 3.0)


def _sphere_kernel(image: sitk.Image, radius_mm: float, subsamples: int = 1) -> Array:
    """Sphere weights on the voxel lattice of ``image`` as a (z, y, x) array with odd sizes.

    ``subsamples == 1``: weight 1 for the offsets whose voxel centre lies within ``radius_mm`` of the
    central voxel's centre (distance measured in physical space with spacing and direction), else 0.
    ``subsamples == n > 1``: the fraction of the n³ sub-voxel centres of each voxel that lie within
    the radius (partial-voxel weights).
    """
    if subsamples < 1:
        raise QuantifyError(f"subsamples must be >= 1, got {subsamples}")
    m = _index_to_physical_matrix(image)
    minv = np.linalg.inv(m)
    # extreme index offset of a point within the radius along each index axis
    ext = radius_mm * np.linalg.norm(minv, axis=1)
    extra = 0.0 if subsamples == 1 else 0.5
    half = np.floor(ext + extra + 1e-9).astype(int)
    di = np.arange(-half[0], half[0] + 1)
    dj = np.arange(-half[1], half[1] + 1)
    dk = np.arange(-half[2], half[2] + 1)
    kk, jj, ii = np.meshgrid(dk, dj, di, indexing="ij")
    base = np.stack([ii, jj, kk], axis=-1).astype(float)  # (z, y, x, 3) index offsets (i, j, k)
    r2 = radius_mm * radius_mm
    if subsamples == 1:
        p = base @ m.T
        return ((p * p).sum(axis=-1) <= r2).astype(np.float64)
    u = (np.arange(subsamples) + 0.5) / subsamples - 0.5
    sub = np.stack(np.meshgrid(u, u, u, indexing="ij"), axis=-1).reshape(-1, 3)
    acc = np.zeros(base.shape[:3])
    for s in sub:
        p = (base + s) @ m.T
        acc += (p * p).sum(axis=-1) <= r2
    return acc / len(sub)


def suv_peak(image: sitk.Image, mask: sitk.Image, volume_ml: float = 1.0,
             subsamples: int = 1) -> tuple[float, tuple[float, float, float]]:
    """PERCIST SUVpeak: the highest mean over a sphere of ``volume_ml`` centred in the mask.

    The sphere has radius r = (3 V / 4π)^(1/3) (1 mL → 6.2035 mm). Candidate centres are the centres of
    the voxels with mask weight > 0 (and a finite image value); the sphere itself may extend beyond
    the mask (PERCIST). By default (``subsamples=1``) the sphere's voxels are those whose **centres**
    lie within r of the candidate centre, distances measured in physical space, so anisotropic
    spacing and any direction matrix are handled; each counts with weight 1 and the value is their
    plain mean. With ``subsamples = n > 1`` every voxel is weighted by the fraction of its n³ sub-voxel
    centres inside the sphere (partial-voxel weights) and the value is the weighted mean.
    Voxels outside the image or with NaN values are left out of the mean (near the edge of the field
    of view the sphere is truncated, not padded).

    The means of all candidates are computed at once by FFT convolution with the physical-space
    sphere kernel (on the mask's bounding box plus the kernel's reach); the best candidates are then
    recomputed by direct summation, so the returned value carries no FFT round-off. Exact ties (e.g.
    a uniform lesion much bigger than the sphere) go to the candidate that comes first in (z, y, x)
    array order.

    Parameters
    ----------
    image : SimpleITK.Image
        Scalar image, typically SUV (g/mL) or Bq/mL.
    mask : SimpleITK.Image
        Same grid as ``image``: binary or fractional (weight > 0 makes a candidate centre).
    volume_ml : float
        Sphere volume in mL (PERCIST: 1 mL).
    subsamples : int
        1 for centre-in-sphere voxels (default), n > 1 for partial-voxel weights.

    Returns
    -------
    value : float
        SUVpeak in the unit of ``image``.
    centre : tuple of float
        Physical position (x, y, z) in mm of the centre of the sphere that attains it.

    Raises
    ------
    QuantifyError
        Grid mismatch, empty mask within the field of view, non-positive volume.
    """
    check_same_grid(image, mask)
    radius = sphere_radius_mm(volume_ml)
    w = _weights(mask)
    x = _values(image)
    valid = np.isfinite(x)
    cand = (w > 0.0) & valid
    if not cand.any():
        raise EmptyRegionError(f"mask is empty in the image's field of view: no candidate centre for SUVpeak "
                            f"(image {_grid_text(image)})")
    kernel = _sphere_kernel(image, radius, subsamples)
    half = np.asarray(kernel.shape) // 2  # (z, y, x)
    shape = np.asarray(x.shape)
    idx = np.argwhere(cand)
    lo = np.maximum(idx.min(axis=0) - half, 0)
    hi = np.minimum(idx.max(axis=0) + half + 1, shape)
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    xv = np.where(valid, x, 0.0)[box]
    vv = valid[box].astype(np.float64)
    # the kernel is point-symmetric, so convolution equals correlation
    sums = signal.fftconvolve(xv, kernel, mode="same")
    counts = signal.fftconvolve(vv, kernel, mode="same")
    local = idx - lo
    c_sum = sums[tuple(local.T)]
    c_cnt = counts[tuple(local.T)]
    approx = np.where(c_cnt > 1e-9, c_sum / np.maximum(c_cnt, 1e-9), -np.inf)
    # Recompute by direct summation every candidate within FFT round-off of the best (at least the
    # _PEAK_REFINE best), within a work budget. Candidates are ranked by their FFT mean quantised to
    # 1e-10 of the image's scale, then by array order, so that FFT noise does not reorder exact ties.
    amax = float(approx.max())
    if not math.isfinite(amax):
        raise QuantifyError("no SUVpeak sphere contains a voxel of the image's field of view")
    scale = max(abs(amax), float(np.abs(xv).max(initial=0.0)), 1e-300)
    rank = np.where(np.isfinite(approx), np.round(approx / scale * 1e10), -np.inf)
    order = np.lexsort((np.arange(len(idx)), -rank))
    n_near = int((approx >= amax - 1e-7 * scale).sum())
    offs = np.argwhere(kernel > 0) - half
    kw = kernel[kernel > 0]
    budget = max(_PEAK_REFINE, int(_PEAK_REFINE_WORK // len(offs)))
    refine = order[:min(len(idx), max(_PEAK_REFINE, n_near), budget)]
    binary = subsamples == 1
    exact = np.full(len(refine), -np.inf)
    chunk = max(1, int(2_000_000 // len(offs)))
    for a in range(0, len(refine), chunk):
        rows = refine[a:a + chunk]
        pts = idx[rows][:, None, :] + offs[None, :, :]
        inside = np.all((pts >= 0) & (pts < shape), axis=2)
        pc = np.where(inside[..., None], pts, 0)
        ok = inside & valid[pc[..., 0], pc[..., 1], pc[..., 2]]
        vals = np.where(ok, x[pc[..., 0], pc[..., 1], pc[..., 2]], 0.0)
        wts = ok * (1.0 if binary else kw[None, :])
        num = vals.sum(axis=1) if binary else (wts * vals).sum(axis=1)
        den = wts.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            exact[a:a + chunk] = np.where(den > 0, num / den, -np.inf)
    best = float(exact.max())
    best_i = int(refine[np.flatnonzero(exact == best)].min()) if math.isfinite(best) else -1
    best_val = best
    if best_i < 0:
        raise QuantifyError("no SUVpeak sphere contains a voxel of the image's field of view")
    k, j, i = (int(v) for v in idx[best_i])
    centre = image.TransformIndexToPhysicalPoint((i, j, k))
    return best_val, (float(centre[0]), float(centre[1]), float(centre[2]))


