"""Mask propagation: volume-preserving signed distance maps resampled once onto the target grid."""

from __future__ import annotations

from typing import Mapping

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from ..geometry import Grid

__all__ = ["signed_distance", "propagate_mask", "propagate_masks", "dice"]

Array = np.ndarray

# =============================================================================== mask propagation

def signed_distance(mask: sitk.Image, volume_preserving: bool = True) -> sitk.Image:
    """Signed distance (mm, negative inside) whose zero level is a smooth surface through a voxel-centre mask.

    ``(d_fg - d_bg) / 2`` from two Maurer maps in physical units (``d_fg``: distance to the nearest
    inside boundary voxel centre, ``d_bg``: to the nearest outside one) puts the zero level half-way
    between the last inside and the first outside voxel centre along the grid axes. On small convex
    objects that surface cuts the corners of the voxel staircase and loses volume (≈ -15 % for a
    10 mm sphere drawn on 5 mm voxels). With ``volume_preserving`` the level is then shifted by the
    constant that makes the enclosed volume (measured with random points, see :func:`_volume_level`)
    equal to the voxel count × voxel volume, the unbiased volume estimate of a voxel-centre mask.
    Compute it on a mask cropped with a margin (as :func:`propagate_mask` does), so that the
    object lies well inside the grid.

    Parameters
    ----------
    mask
        Binary mask (non-zero = inside).
    volume_preserving
        Shift the level to preserve the mask's volume.

    Returns
    -------
    sitk.Image
        float32 on the mask's grid.
    """
    m = sitk.Cast(mask > 0, sitk.sitkUInt8)
    d_in = sitk.SignedMaurerDistanceMap(m, insideIsPositive=False, squaredDistance=False,
                                        useImageSpacing=True)
    d_out = sitk.SignedMaurerDistanceMap(1 - m, insideIsPositive=True, squaredDistance=False,
                                         useImageSpacing=True)
    phi = sitk.Cast((d_in + d_out) * 0.5, sitk.sitkFloat32)
    if not volume_preserving:
        return phi
    count = int(np.count_nonzero(sitk.GetArrayViewFromImage(m)))
    if count == 0:
        return phi
    return phi - _volume_level(phi, count)


def _volume_level(phi: sitk.Image, count: int, max_points: int = 1_000_000) -> float:
    """Level c such that {phi <= c} (trilinear phi) encloses ``count`` voxels' volume.

    The volume is measured with uniformly random points (fixed seed) over the region spanned by
    the voxel centres: a regular sub-grid would share the mask's period and alias with the
    voxel staircase (its samples take a few repeated values, leaving the level undetermined).
    The object must lie inside that region (callers crop with a margin).
    """
    arr = sitk.GetArrayFromImage(phi).astype(np.float32)
    shape = np.asarray(arr.shape)
    region = float(np.prod(np.maximum(shape - 1, 1)))
    k_pts = int(min(max_points, max(200_000, 16 * arr.size)))
    rng = np.random.default_rng(12345)
    pts = rng.uniform(0.0, 1.0, (3, k_pts)) * (np.maximum(shape - 1, 0)[:, None])
    vals = ndimage.map_coordinates(arr, pts, order=1, mode="nearest")
    k = int(round(count / region * k_pts))
    k = min(max(k, 1), k_pts - 1)
    part = np.partition(vals, (k - 1, k))
    return 0.5 * (float(part[k - 1]) + float(part[k]))


def _crop_to_mask(mask: sitk.Image, margin_vox: int = 3) -> sitk.Image | None:
    arr = sitk.GetArrayViewFromImage(mask)
    nz = np.argwhere(arr > 0)
    if len(nz) == 0:
        return None
    lo = np.maximum(nz.min(axis=0) - margin_vox, 0)
    hi = np.minimum(nz.max(axis=0) + margin_vox + 1, arr.shape)
    size = [int(v) for v in (hi - lo)[::-1]]
    return sitk.RegionOfInterest(mask, size, [int(v) for v in lo[::-1]])


def mask_distance(mask: sitk.Image) -> sitk.Image | None:
    """The signed distance map :func:`propagate_mask` samples (on the mask's bounding box plus a margin),
    or None for an empty mask. Compute it once per mask when carrying it onto several grids."""
    roi = _crop_to_mask(mask)
    return None if roi is None else signed_distance(roi)


def propagate_mask(mask: sitk.Image, transform: sitk.Transform | None, target: sitk.Image,
                   fractional: bool = False, supersample: int = 4,
                   smooth_subsamples: bool = True, distance: sitk.Image | None = None) -> sitk.Image:
    """Carry a mask drawn on the reference grid onto a target (emission) grid in one resampling.

    Parameters
    ----------
    mask
        Binary mask (non-zero = inside) on the reference CT grid.
    transform
        Maps **target-space points to reference-space points** (None = identity, same frame).
        For a session's emission image this is ``emission_to_reference(result.inverse, ...)``,
        i.e. the *inverse* of ``RegistrationResult.transform`` (which maps reference → session).
    target
        Image whose grid the result lives on (only its geometry is used).
    fractional
        False: binary mask, a target voxel is inside when its centre is. True: partial-volume
        weight in [0, 1] per target voxel, the mean occupancy of ``supersample``³ sub-cells (a
        regular sub-grid of the target voxel, mapped through ``transform`` one by one).
    supersample
        Sub-cells per axis of the fractional mode (4: an even count puts no sub-point on a voxel
        centre of either grid, where the interpolated distance takes few distinct values).
    distance
        ``mask_distance(mask)`` when already computed (reused for every target grid); None: computed here.
    smooth_subsamples
        Occupancy of a sub-cell = clip(1/2 − φ/h, 0, 1) (φ the signed distance at its centre, h the
        sub-cell size: exact for a plane parallel to a face) instead of 0/1 by the sign of φ. On
        the tiny cohort this brings the fractional volume of 3–12 mL lesions from ±6 % to ≤ 1 %
        of the drawn mask's volume.

    Returns
    -------
    sitk.Image
        uint8 (binary) or float32 (fractional) on ``target``'s grid.

    Notes
    -----
    Binary method, and why: the mask is not resampled by nearest neighbour (it adds the reference
    grid's staircase to the target's) nor by thresholding a linearly interpolated binary image at
    0.5 (the same staircase, and small convex objects shrink). With the true transforms of the tiny
    cohort (Dice vs the exact mask on PET/SPECT grids) nearest neighbour gave liver 0.96–0.98 and
    lesions usually 0.03–0.24 below this method (rarely above), linear+0.5 the same liver and lesions
    equal or up to 0.16 lower; this method gave liver 0.975–0.984. Instead the mask's signed distance map
    (:func:`signed_distance`: zero level half-way between inside and outside voxel centres, shifted
    to preserve the mask's volume) is interpolated linearly at the target voxel centres and
    thresholded at 0. The surface is reconstructed smoothly between the reference voxel centres
    and sampled once, at the target points; the fractional mode samples the same function.
    Points mapping outside the reference grid are outside. Cost: two distance maps on the
    mask's bounding box (plus a 3-voxel margin) and one resampling per mask.
    """
    grid = Grid.of(target)
    tr = transform if transform is not None else sitk.Transform(3, sitk.sitkIdentity)
    sdf = distance if distance is not None else mask_distance(mask)
    if sdf is None:
        out = sitk.Image(target.GetSize(), sitk.sitkFloat32 if fractional else sitk.sitkUInt8)
        out.CopyInformation(target)
        return out
    outside = 1.0e4
    phi = sitk.Resample(sdf, target, tr, sitk.sitkLinear, outside, sitk.sitkFloat32)
    phi_a = sitk.GetArrayFromImage(phi)
    if not fractional:
        out = sitk.GetImageFromArray((phi_a <= 0.0).astype(np.uint8))
        out.CopyInformation(target)
        return out
    # fractional: supersample only the voxels near or inside the surface
    n = int(supersample)
    half_diag = 0.5 * float(np.linalg.norm(grid.spacing)) + 0.5 * float(np.linalg.norm(mask.GetSpacing()))
    frac = (phi_a <= -half_diag).astype(np.float32)
    band = np.abs(phi_a) < half_diag
    if band.any():
        idx = np.argwhere(band)
        lo, hi = idx.min(axis=0), idx.max(axis=0) + 1
        corner = grid.index_to_physical(lo[::-1][None, :].astype(float))[0]
        sub_grid = Grid(size=tuple(int(v) for v in (hi - lo)[::-1]),  # type: ignore[arg-type]
                        spacing=grid.spacing, direction=grid.direction,
                        origin=tuple(float(v) for v in corner))  # type: ignore[arg-type]
        fine = sub_grid.refined(n)
        ref = fine.image()
        phi_f = sitk.GetArrayFromImage(sitk.Resample(sdf, ref, tr, sitk.sitkLinear, outside,
                                                     sitk.sitkFloat32))
        nz, ny, nx = sub_grid.shape_zyx
        if smooth_subsamples:
            h = float(np.prod(grid.spacing)) ** (1.0 / 3.0) / n
            occ = np.clip(0.5 - phi_f / h, 0.0, 1.0)
        else:
            occ = (phi_f <= 0.0).astype(np.float32)
        f = occ.reshape(nz, n, ny, n, nx, n).mean(axis=(1, 3, 5)).astype(np.float32)
        block = frac[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        b = band[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        block[b] = f[b]
    out = sitk.GetImageFromArray(frac)
    out.CopyInformation(target)
    return out


def propagate_masks(masks: Mapping[str, sitk.Image], transform: sitk.Transform | None, target: sitk.Image,
                    fractional: bool = False) -> dict[str, sitk.Image]:
    """:func:`propagate_mask` for every mask of a dict (same transform and target)."""
    return {k: propagate_mask(m, transform, target, fractional) for k, m in masks.items()}


def dice(a: Array | sitk.Image, b: Array | sitk.Image) -> float:
    """Dice coefficient of two binary masks (arrays or images on the same grid); 1.0 when both are empty."""
    aa = sitk.GetArrayViewFromImage(a) if isinstance(a, sitk.Image) else np.asarray(a)
    bb = sitk.GetArrayViewFromImage(b) if isinstance(b, sitk.Image) else np.asarray(b)
    aa, bb = aa.astype(bool), bb.astype(bool)
    s = int(aa.sum()) + int(bb.sum())
    return 1.0 if s == 0 else 2.0 * float(np.count_nonzero(aa & bb)) / s


