"""Quantification core: ROI statistics, SUVpeak, enhancement ratios, T/N and the trials' decision rules.

Everything here is pure computation on SimpleITK images that live in physical space (DICOM patient
coordinates, LPS, millimetres) and on plain numbers; reading and writing files and the wiring into the
workflow live elsewhere.

Conventions
-----------
* A **mask** is a SimpleITK image on exactly the same grid (size, spacing, origin, direction) as the
  image it is applied to. Integer masks must be binary (0/1); floating-point masks are fractional
  weights in [0, 1] (e.g. partial-volume weights after resampling). Grids are never silently
  resampled: a mismatch raises :class:`QuantifyError` (a :class:`ValueError`) naming both grids.
* Non-finite image voxels (NaN, typically the outside of a resampled emission field of view) are not
  part of the image's field of view: they are left out of every statistic.
* Image values keep their unit (SUV, Bq/mL, ...); volumes are in mL (1 mL = 1000 mm³), distances in mm.
* Ratios are taken as given (no rounding); thresholds are compared with ``>=`` on the floating-point
  value, with means formed by :func:`math.fsum` so that, e.g., the mean of 2.5, 3.5 and 3.0 is exactly 3.0.

>>> import SimpleITK as sitk
>>> img = sitk.Image([4, 4, 4], sitk.sitkFloat32) + 3.0
>>> img.SetSpacing([10.0, 10.0, 10.0])
>>> m = sitk.Image([4, 4, 4], sitk.sitkUInt8) + 1
>>> m.CopyInformation(img)
>>> s = region_stats(img, m)
>>> s["mean"], s["volume_ml"]
(3.0, 64.0)
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import SimpleITK as sitk
from scipy import ndimage, signal, stats

__all__ = [
    "QuantifyError",
    "EmptyRegionError",
    "check_same_grid",
    "region_stats",
    "sphere_radius_mm",
    "suv_peak",
    "enhancement_ratios",
    "eligibility",
    "tumour_to_liver",
    "sstr_positive",
    "lobe_tn",
    "healthy_liver_mask",
    "assign_lobe",
    "paired_lobe_comparison",
    "retreatment_fraction",
]

Array = np.ndarray

#: Origins may differ by this fraction of the smallest voxel spacing and still be the same grid.
_ORIGIN_TOL_FRACTION = 1e-3
#: Relative tolerance on spacings, absolute tolerance on direction cosines.
_SPACING_RTOL = 1e-6
_DIRECTION_ATOL = 1e-6
#: Fractional mask weights may stray this far outside [0, 1] (interpolation round-off) and are clipped.
_WEIGHT_SLACK = 1e-6
#: Number of best FFT candidates whose SUVpeak is recomputed by direct summation.
_PEAK_REFINE = 64
#: Upper bound on (candidates × kernel voxels) recomputed directly (ties in uniform regions).
_PEAK_REFINE_WORK = 5e6


class QuantifyError(ValueError):
    """Inputs that cannot be quantified as asked (grid mismatch, empty mask, invalid numbers)."""


class EmptyRegionError(QuantifyError):
    """A mask with no voxel in the image's field of view (e.g. a lesion outside a PET's axial coverage)."""


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


def _voxel_ml(image: sitk.Image) -> float:
    return float(np.prod(image.GetSpacing())) / 1000.0


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
    vml = _voxel_ml(image)
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


# --------------------------------------------------------------------------- enhancement ratio (Bordeaux)

_ER_SOURCES = {"er_mean": ("suvmean", "mean"), "er_max": ("suvmax", "max"), "er_peak": ("suvpeak", "peak")}


def _stat(d: Mapping[str, float] | None, keys: tuple[str, str]) -> float:
    if d is None:
        return math.nan
    for k in keys:
        if k in d and d[k] is not None:
            return float(d[k])
    return math.nan


def _ratio(a: float, b: float) -> float:
    if not (math.isfinite(a) and math.isfinite(b)) or b <= 0.0:
        return math.nan
    return a / b


def enhancement_ratios(ia: Mapping[str, Mapping[str, float]],
                       iv: Mapping[str, Mapping[str, float]]) -> pd.DataFrame:
    """Per-lesion enhancement ratios IA / IV.

    Parameters
    ----------
    ia, iv : mapping
        Lesion name → statistics of the IA and IV PET (SUV, g/mL): keys ``suvmean``, ``suvmax`` and
        optionally ``suvpeak`` (``mean``/``max``/``peak`` are accepted too, e.g. straight from
        :func:`region_stats`).

    Returns
    -------
    pandas.DataFrame
        Indexed by lesion (IA order, then lesions only on IV) with columns ``er_mean`` =
        SUVmean(IA)/SUVmean(IV), ``er_max`` = SUVmax(IA)/SUVmax(IV), ``er_peak`` =
        SUVpeak(IA)/SUVpeak(IV) (dimensionless), and the inputs ``suvmean_ia``, ``suvmean_iv``,
        ``suvmax_ia``, ``suvmax_iv``, ``suvpeak_ia``, ``suvpeak_iv``. A ratio is NaN when a value is
        missing on either side or the IV value is not positive.
    """
    names = list(ia) + [k for k in iv if k not in ia]
    rows = []
    for name in names:
        a, b = ia.get(name), iv.get(name)
        row: dict[str, Any] = {"lesion": name}
        for er, keys in _ER_SOURCES.items():
            va, vb = _stat(a, keys), _stat(b, keys)
            row[er] = _ratio(va, vb)
            row[f"{keys[0]}_ia"], row[f"{keys[0]}_iv"] = va, vb
        rows.append(row)
    cols = ["lesion", "er_mean", "er_max", "er_peak", "suvmean_ia", "suvmean_iv", "suvmax_ia", "suvmax_iv",
            "suvpeak_ia", "suvpeak_iv"]
    return pd.DataFrame(rows, columns=cols).set_index("lesion")


def eligibility(er: pd.DataFrame, statistic: str = "er_max", threshold: float = 3.0, max_lesions: int = 5,
                qc_flags: Sequence[str] = (), lesions: Sequence[str] | None = None) -> dict[str, Any]:
    """Bordeaux-style eligibility for an IA cycle: mean enhancement ratio over target lesions ≥ threshold.

    Parameters
    ----------
    er : pandas.DataFrame
        From :func:`enhancement_ratios` (index = lesion).
    statistic : {"er_max", "er_mean", "er_peak"}
        Column averaged.
    threshold : float
        Dimensionless ER threshold (trial: 3.0); eligible when value >= threshold.
    max_lesions : int
        At most this many target lesions are used: the first ones in ``lesions`` order (default: the
        frame's row order, i.e. the order the readers chose them in), after dropping lesions whose
        ratio is not finite.
    qc_flags : sequence of str
        Quality-control flags raised upstream; any flag sets ``flagged`` (eligibility is still computed).
    lesions : sequence of str, optional
        Target lesions (e.g. the MRI-chosen ones); default every row.

    Returns
    -------
    dict
        ``statistic``, ``value`` (fsum-based mean, None when no lesion is evaluable), ``threshold``,
        ``eligible`` (bool), ``n_lesions``, ``lesions`` (used), ``excluded_lesions`` (non-finite
        ratio), ``qc_flags`` (input flags plus ``non_finite_er:<lesion>`` / ``no_evaluable_lesions``),
        ``flagged``.
    """
    if statistic not in _ER_SOURCES:
        raise QuantifyError(f"statistic must be one of {sorted(_ER_SOURCES)}, got {statistic!r}")
    if statistic not in er.columns:
        raise QuantifyError(f"enhancement-ratio table has no column {statistic!r} "
                            f"(columns {list(er.columns)})")
    if max_lesions < 1:
        raise QuantifyError(f"max_lesions must be >= 1, got {max_lesions}")
    order = list(er.index) if lesions is None else list(lesions)
    missing = [l for l in order if l not in er.index]
    if missing:
        raise QuantifyError(f"target lesions not in the enhancement-ratio table: {missing}")
    flags = [str(f) for f in qc_flags]
    used: list[str] = []
    excluded: list[str] = []
    for l in order:
        v = float(er.at[l, statistic])
        if not math.isfinite(v):
            excluded.append(l)
            flags.append(f"non_finite_er:{l}")
        elif len(used) < max_lesions:
            used.append(l)
    if used:
        value: float | None = math.fsum(float(er.at[l, statistic]) for l in used) / len(used)
        eligible = bool(value >= threshold)
    else:
        value, eligible = None, False
        flags.append("no_evaluable_lesions")
    return {"statistic": statistic, "value": value, "threshold": float(threshold), "eligible": eligible,
            "n_lesions": len(used), "lesions": used, "excluded_lesions": excluded, "qc_flags": flags,
            "flagged": bool(flags)}


# --------------------------------------------------------------------------- SSTR positivity (Krenning-like)

def _as_value(s: Mapping[str, float] | float, key: str, what: str) -> float:
    if isinstance(s, Mapping):
        if key not in s:
            raise QuantifyError(f"{what} statistics have no key {key!r} (keys {sorted(s)})")
        return float(s[key])
    return float(s)


def tumour_to_liver(lesion_stats: Mapping[str, float] | float,
                    healthy_liver_stats: Mapping[str, float] | float,
                    lesion_key: str = "mean", liver_key: str = "mean") -> float:
    """Tumour-to-liver ratio: lesion uptake / healthy-liver uptake (dimensionless).

    Parameters
    ----------
    lesion_stats, healthy_liver_stats : mapping or float
        Statistics dicts (e.g. from :func:`region_stats`) or plain values in the same unit.
    lesion_key, liver_key : str
        Keys used from dicts (default both ``mean``; e.g. ``lesion_key="max"`` for SUVmax/liver SUVmean).

    Raises
    ------
    QuantifyError
        Non-finite values or non-positive liver uptake.
    """
    t = _as_value(lesion_stats, lesion_key, "lesion")
    n = _as_value(healthy_liver_stats, liver_key, "healthy liver")
    if not (math.isfinite(t) and math.isfinite(n)):
        raise QuantifyError(f"tumour-to-liver ratio needs finite values, got lesion {t!r} and liver {n!r}")
    if n <= 0.0:
        raise QuantifyError(f"healthy-liver uptake must be positive for a tumour-to-liver ratio, got {n!r}")
    return t / n


def sstr_positive(tlr: float, threshold: float = 1.0) -> bool:
    """Krenning-like SSTR positivity: lesion uptake at least that of healthy liver (``tlr >= threshold``)."""
    if not math.isfinite(tlr):
        raise QuantifyError(f"tumour-to-liver ratio must be finite, got {tlr!r}")
    return bool(tlr >= threshold)


def retreatment_fraction(tlr_by_lesion: Mapping[str, float], threshold: float = 1.0,
                         required: float = 0.9) -> dict[str, Any]:
    """ReLUTH rule: at least ``required`` of the lesions are SSTR-positive (uptake >= healthy liver).

    Parameters
    ----------
    tlr_by_lesion : mapping
        Lesion → tumour-to-liver ratio (dimensionless).
    threshold : float
        A lesion is positive when its ratio >= threshold (1.0: as avid as liver).
    required : float
        Fraction of positive lesions required (0.9 = 90 %); ``meets_rule`` when fraction >= required
        (the fraction k/n is a correctly rounded division, so 9/10 meets 0.9).

    Returns
    -------
    dict
        ``n_lesions``, ``n_positive``, ``fraction``, ``threshold``, ``required``, ``meets_rule``,
        ``positive_lesions``, ``negative_lesions``.
    """
    if not tlr_by_lesion:
        raise QuantifyError("retreatment rule needs at least one lesion")
    pos, neg = [], []
    for name, v in tlr_by_lesion.items():
        (pos if sstr_positive(float(v), threshold) else neg).append(name)
    n = len(pos) + len(neg)
    frac = len(pos) / n
    return {"n_lesions": n, "n_positive": len(pos), "fraction": frac, "threshold": float(threshold),
            "required": float(required), "meets_rule": bool(frac >= required), "positive_lesions": pos,
            "negative_lesions": neg}


# --------------------------------------------------------------------------- lobar T/N (LUTIA)

def lobe_tn(lesion_means: Mapping[str, float], lesion_voxels: Mapping[str, float],
            lesion_lobe: Mapping[str, str],
            healthy_lobe_mean: Mapping[str, float], treated_lobe: str | None,
            control_lobe: str | None = None) -> dict[str, Any]:
    """Tumour-to-non-tumour activity-concentration ratio per liver lobe.

    Parameters
    ----------
    lesion_means : mapping
        Lesion → mean activity concentration (e.g. Bq/mL).
    lesion_voxels : mapping
        Lesion → voxel count (or weight sum) of its mask; lesion masks are assumed disjoint, so the mean
        over the union of a lobe's lesion voxels is the voxel-weighted mean of the lesion means.
    lesion_lobe : mapping
        Lesion → lobe name (e.g. from :func:`assign_lobe`). Only lesions listed here are used.
    healthy_lobe_mean : mapping
        Lobe → mean concentration of the lobe's healthy liver (N, same unit); defines the lobes reported.
    treated_lobe : str or None
        The IA-treated lobe (lobar design); None for no comparison.
    control_lobe : str, optional
        The control lobe; default the only other lobe of ``healthy_lobe_mean``.

    Returns
    -------
    dict
        ``lobes``: lobe → {``lesions``, ``t`` (union mean, None without lesions), ``n``, ``tn`` (None
        without lesions), ``tn_per_lesion`` (lesion mean / N), ``t_voxels``, ``note``};
        ``treated_lobe``, ``control_lobe``, ``treated_over_control`` (T/N treated ÷ T/N control, None if
        either is None or no treated lobe given) and ``notes``.
    """
    notes: list[str] = []
    for lobe, n in healthy_lobe_mean.items():
        if not (math.isfinite(float(n)) and float(n) > 0.0):
            raise QuantifyError(f"healthy-liver mean of lobe {lobe!r} must be positive, got {n!r}")
    by_lobe: dict[str, list[str]] = {lobe: [] for lobe in healthy_lobe_mean}
    for lesion, lobe in lesion_lobe.items():
        if lobe not in by_lobe:
            raise QuantifyError(f"lesion {lesion!r} is in lobe {lobe!r}, which has no healthy-liver mean "
                                f"(lobes: {sorted(healthy_lobe_mean)})")
        if lesion not in lesion_means or lesion not in lesion_voxels:
            raise QuantifyError(f"lesion {lesion!r} lacks a mean or a voxel count")
        by_lobe[lobe].append(lesion)
    lobes: dict[str, Any] = {}
    for lobe, les in by_lobe.items():
        n = float(healthy_lobe_mean[lobe])
        entry: dict[str, Any] = {"lesions": list(les), "n": n, "tn_per_lesion": {}, "note": None}
        if les:
            v = np.array([float(lesion_voxels[l]) for l in les])
            if (v <= 0).any() or not np.isfinite(v).all():
                raise QuantifyError(f"lesion voxel counts must be positive: {dict(zip(les, v.tolist()))}")
            mu = np.array([float(lesion_means[l]) for l in les])
            t = math.fsum((v * mu).tolist()) / math.fsum(v.tolist())
            entry.update(t=t, tn=t / n, t_voxels=float(v.sum()),
                         tn_per_lesion={l: float(lesion_means[l]) / n for l in les})
        else:
            entry.update(t=None, tn=None, t_voxels=0.0,
                         note=f"no lesions in lobe {lobe!r}: T and T/N undefined")
            notes.append(entry["note"])
        lobes[lobe] = entry
    ratio = None
    if treated_lobe is not None:
        if treated_lobe not in lobes:
            raise QuantifyError(f"treated lobe {treated_lobe!r} not among lobes {sorted(lobes)}")
        if control_lobe is None:
            others = [l for l in lobes if l != treated_lobe]
            if len(others) != 1:
                raise QuantifyError(f"cannot infer the control lobe among {others}; pass control_lobe")
            control_lobe = others[0]
        elif control_lobe not in lobes:
            raise QuantifyError(f"control lobe {control_lobe!r} not among lobes {sorted(lobes)}")
        a, b = lobes[treated_lobe]["tn"], lobes[control_lobe]["tn"]
        if a is None or b is None:
            notes.append("treated/control T/N ratio undefined: a lobe has no lesions")
        else:
            ratio = a / b
    else:
        control_lobe = None
    return {"lobes": lobes, "treated_lobe": treated_lobe, "control_lobe": control_lobe,
            "treated_over_control": ratio, "notes": notes}


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


def assign_lobe(lesion_mask: sitk.Image, left_lobe_mask: sitk.Image, right_lobe_mask: sitk.Image
                ) -> tuple[str, float]:
    """Lobe holding the majority of a lesion.

    Parameters
    ----------
    lesion_mask, left_lobe_mask, right_lobe_mask : SimpleITK.Image
        Masks on one grid (binary or fractional).

    Returns
    -------
    lobe : {"left", "right"}
        The lobe with the larger overlap Σ w_lesion·w_lobe (an exact tie goes to ``left``).
    fraction : float
        Overlap with the chosen lobe / Σ w_lesion (lesion voxels outside both lobes count in the
        denominator).

    Raises
    ------
    QuantifyError
        Grid mismatch, empty lesion, or a lesion that overlaps neither lobe.
    """
    check_same_grid(lesion_mask, left_lobe_mask, "left lobe mask")
    check_same_grid(lesion_mask, right_lobe_mask, "right lobe mask")
    w = _weights(lesion_mask, "lesion mask")
    total = float(w.sum())
    if total <= 0.0:
        raise QuantifyError("lesion mask is empty")
    left = float((w * _weights(left_lobe_mask, "left lobe mask")).sum())
    right = float((w * _weights(right_lobe_mask, "right lobe mask")).sum())
    if left <= 0.0 and right <= 0.0:
        raise QuantifyError("lesion overlaps neither lobe mask")
    return ("left", left / total) if left >= right else ("right", right / total)


def paired_lobe_comparison(tn_treated: Sequence[float], tn_control: Sequence[float],
                           confidence: float = 0.95) -> dict[str, Any]:
    """LUTIA-style paired comparison of T/N between the treated and the control lobe across patients.

    Works on d = log(T/N treated) − log(T/N control) per patient.

    Parameters
    ----------
    tn_treated, tn_control : sequence of float
        Paired positive T/N ratios (dimensionless), one pair per patient.
    confidence : float
        Level of the confidence interval (0.95).

    Returns
    -------
    dict
        ``n``; ``gmr`` = exp(mean d) (geometric mean ratio, treated/control); ``ci_low``, ``ci_high`` =
        exp of the t-distribution interval of mean d (df n − 1, scale SD(d)/√n); ``mean_log_ratio``,
        ``sd_log_ratio``; ``t_statistic`` and ``p_ttest`` (:func:`scipy.stats.ttest_rel` on the logs,
        two-sided); ``p_wilcoxon`` (:func:`scipy.stats.wilcoxon` signed-rank, two-sided, exact when n <= 50
        without zero or tied differences, else asymptotic) and ``wilcoxon_method``; ``n_increase`` and
        ``share_increase`` (patients with treated/control > 1); ``confidence``; ``notes``. With n = 1
        the inferential values are NaN.
    """
    t = np.asarray(tn_treated, dtype=float)
    c = np.asarray(tn_control, dtype=float)
    if t.shape != c.shape or t.ndim != 1:
        raise QuantifyError(f"paired T/N sequences must have equal length: {t.shape} vs {c.shape}")
    n = int(t.size)
    if n == 0:
        raise QuantifyError("paired comparison needs at least one patient")
    if not (np.isfinite(t).all() and np.isfinite(c).all() and (t > 0).all() and (c > 0).all()):
        raise QuantifyError("T/N ratios must be finite and positive for a log-scale comparison")
    if not 0.0 < confidence < 1.0:
        raise QuantifyError(f"confidence must lie in (0, 1), got {confidence!r}")
    lt, lc = np.log(t), np.log(c)
    d = lt - lc
    mean_d = float(d.mean())
    notes: list[str] = []
    res: dict[str, Any] = {"n": n, "gmr": math.exp(mean_d), "mean_log_ratio": mean_d,
                           "n_increase": int((d > 0).sum()), "share_increase": float((d > 0).sum()) / n,
                           "confidence": confidence, "notes": notes}
    nan = math.nan
    if n < 2:
        notes.append("n = 1: no confidence interval or tests")
        res.update(sd_log_ratio=nan, ci_low=nan, ci_high=nan, t_statistic=nan, p_ttest=nan, p_wilcoxon=nan,
                   wilcoxon_method=None)
        return res
    sd = float(d.std(ddof=1))
    res["sd_log_ratio"] = sd
    if sd > 0.0:
        lo, hi = stats.t.interval(confidence, n - 1, loc=mean_d, scale=sd / math.sqrt(n))
        tt = stats.ttest_rel(lt, lc)
        res.update(ci_low=math.exp(float(lo)), ci_high=math.exp(float(hi)), t_statistic=float(tt.statistic),
                   p_ttest=float(tt.pvalue))
    else:
        notes.append("all log ratios are equal: zero variance, no t-test")
        res.update(ci_low=math.exp(mean_d), ci_high=math.exp(mean_d), t_statistic=nan, p_ttest=nan)
    nz = d[d != 0.0]
    if nz.size == 0:
        notes.append("all differences are zero: no Wilcoxon test")
        res.update(p_wilcoxon=nan, wilcoxon_method=None)
    else:
        ties = np.unique(np.abs(nz)).size < nz.size
        method = "exact" if (n <= 50 and nz.size == n and not ties) else "asymptotic"
        wr = stats.wilcoxon(lt, lc, method=method)
        res.update(p_wilcoxon=float(wr.pvalue), wilcoxon_method=method)
    return res
