"""Masks on grids, region statistics and the healthy-liver mask."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from ..errors import EmptyRegionError, QuantifyError
from ..geometry import voxel_volume_ml

__all__ = ["QuantifyError", "EmptyRegionError", "check_same_grid", "region_stats", "healthy_liver_mask"]

Array = np.ndarray

#: Origins may differ by this fraction of the smallest voxel spacing and still be the same grid.
_ORIGIN_TOL_FRACTION = 1e-3
#: Relative tolerance on spacings, absolute tolerance on direction cosines.
_SPACING_RTOL = 1e-6
_DIRECTION_ATOL = 1e-6
#: Fractional mask weights may stray this far outside [0, 1] (interpolation round-off) and are clipped.
_WEIGHT_SLACK = 1e-6
#: Number of best FFT candidates whose SUVpeak is recomputed by direct summation.


# --------------------------------------------------------------------------- grids and masks

def _grid_text(img: sitk.Image) -> str:
    return (f"size {tuple(int(v) for v in img.GetSize())}, "
            f"spacing {tuple(round(float(v), 6) for v in img.GetSpacing())} mm, "
            f"origin {tuple(round(float(v), 4) for v in img.GetOrigin())} mm, "
            f"direction {tuple(round(float(v), 6) for v in img.GetDirection())}")


def check_same_grid(image: sitk.Image, mask: sitk.Image, what: str = "mask") -> None:
    """Raise :class:`QuantifyError` unless ``mask`` lies on the same voxel grid as ``image``.

    Parameters
    ----------
    image, mask : SimpleITK.Image
        3-D images. Sizes must be equal; spacings equal to a relative 1e-6; origins equal to 1e-3 of
        the smallest spacing (mm); direction cosines equal to 1e-6.
    what : str
        Name of ``mask`` used in the message.

    Raises
    ------
    QuantifyError
        Naming both grids (size, spacing, origin, direction).
    """
    if image.GetDimension() != 3 or mask.GetDimension() != 3:
        raise QuantifyError(f"3-D images expected: image is {image.GetDimension()}-D, {what} is "
                            f"{mask.GetDimension()}-D")
    sp = np.asarray(image.GetSpacing(), dtype=float)
    same = (
        tuple(image.GetSize()) == tuple(mask.GetSize())
        and np.allclose(sp, mask.GetSpacing(), rtol=_SPACING_RTOL, atol=0.0)
        and np.allclose(image.GetOrigin(), mask.GetOrigin(), rtol=0.0, atol=_ORIGIN_TOL_FRACTION * sp.min())
        and np.allclose(image.GetDirection(), mask.GetDirection(), rtol=0.0, atol=_DIRECTION_ATOL)
    )
    if not same:
        raise QuantifyError(f"{what} grid differs from the image grid: image has {_grid_text(image)}; "
                            f"{what} has {_grid_text(mask)}. Resample the {what} onto the image first.")


def _weights(mask: sitk.Image, what: str = "mask") -> Array:
    """Mask weights as a float64 (z, y, x) array in [0, 1]."""
    if mask.GetNumberOfComponentsPerPixel() != 1:
        raise QuantifyError(f"{what} must be a scalar image, it has "
                            f"{mask.GetNumberOfComponentsPerPixel()} components")
    a = sitk.GetArrayFromImage(mask)
    if np.issubdtype(a.dtype, np.integer) or a.dtype == bool:
        bad = (a != 0) & (a != 1)
        if bad.any():
            raise QuantifyError(f"integer {what} must be binary (0/1); found values "
                                f"{sorted(np.unique(a[bad]).tolist())[:5]}")
        return a.astype(np.float64)
    w = a.astype(np.float64)
    if not np.isfinite(w).all():
        raise QuantifyError(f"fractional {what} contains non-finite weights")
    if w.size and (w.min() < -_WEIGHT_SLACK or w.max() > 1.0 + _WEIGHT_SLACK):
        raise QuantifyError(f"fractional {what} weights must lie in [0, 1]; found "
                            f"[{w.min():.6g}, {w.max():.6g}]")
    return np.clip(w, 0.0, 1.0)


def _values(image: sitk.Image) -> Array:
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise QuantifyError(f"image must be scalar, it has {image.GetNumberOfComponentsPerPixel()} "
                            "components")
    return sitk.GetArrayFromImage(image).astype(np.float64)


def _index_to_physical_matrix(image: sitk.Image) -> Array:
    """3×3 matrix M with physical displacement = M @ (di, dj, dk) (index axes x, y, z)."""
    d = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    return d @ np.diag(np.asarray(image.GetSpacing(), dtype=float))


# --------------------------------------------------------------------------- region statistics

def region_stats(image: sitk.Image, mask: sitk.Image) -> dict[str, float]:
    """Statistics of ``image`` inside ``mask``.

    Parameters
    ----------
    image : SimpleITK.Image
        Scalar image (any unit, e.g. SUV or Bq/mL). NaN voxels are outside the field of view and
        ignored.
    mask : SimpleITK.Image
        Same grid as ``image``. Binary (integer 0/1) or fractional weights w in [0, 1] (float).

    Returns
    -------
    dict
        ``mean``: weighted mean Σ w·x / Σ w (image unit);
        ``max``, ``min``: over voxels with w > 0 (a fractional weight does not scale the value);
        ``std``: weighted population standard deviation √(Σ w (x − mean)² / Σ w);
        ``n_voxels``: Σ w (voxel count for a binary mask);
        ``volume_ml``: Σ w × voxel volume (mL);
        ``sum``: Σ w·x; ``integral``: Σ w·x × voxel volume (image unit × mL, e.g. Bq for Bq/mL);
        ``fraction_in_fov``: Σ w over finite voxels / Σ w over the whole mask.

    Raises
    ------
    QuantifyError
        If the grids differ (the message names both sizes and origins), if the mask is not binary
        or not within [0, 1], or if it is empty within the image's field of view.
    """
    check_same_grid(image, mask)
    w = _weights(mask)
    x = _values(image)
    total = float(w.sum())
    fin = np.isfinite(x)
    w_in = np.where(fin, w, 0.0)
    wsum = float(w_in.sum())
    if wsum <= 0.0:
        where = "is empty" if total <= 0.0 else "lies entirely outside the image's field of view (NaN voxels)"
        raise EmptyRegionError(f"mask {where}: no voxel with weight > 0 in the image's field of view "
                            f"(image {_grid_text(image)})")
    sel = w_in > 0.0
    xs, ws = x[sel], w_in[sel]
    s = float(np.dot(ws, xs))
    mean = s / wsum
    var = float(np.dot(ws, (xs - mean) ** 2)) / wsum
    vml = voxel_volume_ml(image)
    return {
        "mean": mean,
        "max": float(xs.max()),
        "min": float(xs.min()),
        "std": math.sqrt(max(var, 0.0)),
        "n_voxels": wsum,
        "volume_ml": wsum * vml,
        "sum": s,
        "integral": s * vml,
        "fraction_in_fov": wsum / total,
    }


def healthy_liver_mask(liver: sitk.Image, lesions: Sequence[sitk.Image],
                       margin_mm: float = 0.0) -> sitk.Image:
    """Liver minus the lesions dilated by ``margin_mm`` in physical space.

    A liver voxel is removed when its centre lies within ``margin_mm`` (inclusive) of the centre of some
    lesion voxel (any lesion weight > 0), measured with a Euclidean distance map in mm
    (:func:`scipy.ndimage.distance_transform_edt` with the voxel spacing, so anisotropic voxels are
    handled; the grid must have orthogonal axes). ``margin_mm = 0`` removes exactly the lesion voxels.
    Because the dilation acts on voxel centres, a sphere of radius R dilated by m removes a subset of
    the voxel centres within R + m, and all of those within R + m − √3·(largest spacing).

    Parameters
    ----------
    liver : SimpleITK.Image
        Liver (or lobe) mask, binary or fractional.
    lesions : sequence of SimpleITK.Image
        Lesion masks on the same grid.
    margin_mm : float
        Safety margin in mm (>= 0).

    Returns
    -------
    SimpleITK.Image
        Same pixel type and geometry as ``liver``; removed voxels set to 0, others unchanged.
    """
    if not (margin_mm >= 0.0 and math.isfinite(margin_mm)):
        raise QuantifyError(f"margin_mm must be a finite number >= 0, got {margin_mm!r}")
    _weights(liver, "liver mask")
    union = np.zeros(tuple(reversed(liver.GetSize())), dtype=bool)
    for n, les in enumerate(lesions):
        check_same_grid(liver, les, what=f"lesion mask {n}")
        union |= _weights(les, f"lesion mask {n}") > 0.0
    out_arr = sitk.GetArrayFromImage(liver)
    if union.any():
        excluded = union.copy()
        if margin_mm > 0.0:
            d = np.asarray(liver.GetDirection(), dtype=float).reshape(3, 3)
            if not np.allclose(d.T @ d, np.eye(3), atol=1e-6):
                raise QuantifyError("healthy_liver_mask needs a grid with orthogonal axes")
            sp_zyx = np.asarray(liver.GetSpacing(), dtype=float)[::-1]
            reach = np.ceil(margin_mm / sp_zyx).astype(int) + 1
            idx = np.argwhere(union)
            lo = np.maximum(idx.min(axis=0) - reach, 0)
            hi = np.minimum(idx.max(axis=0) + reach + 1, union.shape)
            box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
            dist = ndimage.distance_transform_edt(~union[box], sampling=sp_zyx)
            excluded[box] |= dist <= margin_mm
        out_arr = out_arr.copy()
        out_arr[excluded] = 0
    out = sitk.GetImageFromArray(out_arr)
    out.CopyInformation(liver)
    return out


