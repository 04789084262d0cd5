"""TIA maps, per-region dose statistics and dose-volume histograms."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import SimpleITK as sitk

from ..geometry import voxel_volume_ml
from ..quantify.regions import check_same_grid
from .kernels import _density_array, _image_like

__all__ = ["dvh", "region_dose", "tia_map"]

Array = np.ndarray

def tia_map(activity_mbq: sitk.Image, regions: Sequence[tuple[sitk.Image, float]], default_ratio: float) -> sitk.Image:
    """Voxel TIA map (MBq·h per voxel) from one activity map (MBq per voxel) and per-region kinetics.

    ``regions`` is an ordered list of (binary mask, TIA/A(t_map) ratio in h); a voxel takes the ratio of
    the first region that contains it, voxels in none take ``default_ratio``. Summed over a region
    that no earlier region overlaps, the map equals that region's TIA exactly.
    """
    a = np.nan_to_num(sitk.GetArrayFromImage(activity_mbq).astype(np.float64), nan=0.0)
    ratio = np.full(a.shape, float(default_ratio))
    done = np.zeros(a.shape, dtype=bool)
    for mask, r in regions:
        check_same_grid(activity_mbq, mask)
        m = (sitk.GetArrayViewFromImage(mask) > 0) & ~done
        ratio[m] = r
        done |= m
    return _image_like(a * ratio, activity_mbq)


def region_dose(dose: sitk.Image, mask: sitk.Image, density: sitk.Image | None = None) -> dict[str, float]:
    """Mean absorbed dose of a region = deposited energy / mass (mass-weighted mean of voxel doses),
    with min/max, D98/D50/D2 (Gy) and mass (g)."""
    check_same_grid(dose, mask)
    d = sitk.GetArrayFromImage(dose).astype(np.float64)
    w = sitk.GetArrayFromImage(mask).astype(np.float64)
    rho = _density_array(dose, density)
    sel = (w > 0) & np.isfinite(d)
    if not sel.any():
        raise ValueError("region is empty on the dose grid")
    mass = w[sel] * rho[sel] * voxel_volume_ml(dose)
    ds = d[sel]
    return {"mean_gy": float(np.dot(mass, ds) / mass.sum()), "min_gy": float(ds.min()), "max_gy": float(ds.max()),
            "d98_gy": float(np.percentile(ds, 2)), "d50_gy": float(np.percentile(ds, 50)),
            "d2_gy": float(np.percentile(ds, 98)), "mass_g": float(mass.sum())}


def dvh(dose: sitk.Image, mask: sitk.Image, bin_gy: float = 0.1) -> pd.DataFrame:
    """Cumulative dose–volume histogram: ``dose_gy`` (bin edges from 0 to one bin above the maximum) and
    ``volume_fraction`` (fraction of the region's volume, weighted by the mask, receiving ≥ that dose)
    and ``volume_ml``. A uniform region is a step from 1 to 0 at its dose."""
    check_same_grid(dose, mask)
    d = sitk.GetArrayFromImage(dose).astype(np.float64)
    w = sitk.GetArrayFromImage(mask).astype(np.float64)
    sel = (w > 0) & np.isfinite(d)
    if not sel.any():
        raise ValueError("region is empty on the dose grid")
    ds, ws = d[sel], w[sel]
    edges = np.arange(0.0, float(ds.max()) + 2 * bin_gy, bin_gy)
    order = np.argsort(ds)
    cum = np.cumsum(ws[order][::-1])[::-1]  # weight of voxels with dose >= ds[order][i]
    idx = np.searchsorted(ds[order], edges, side="left")
    vol = np.where(idx < len(ds), cum[np.minimum(idx, len(ds) - 1)], 0.0)
    frac = vol / ws.sum()
    return pd.DataFrame({"dose_gy": edges, "volume_fraction": frac, "volume_ml": vol * voxel_volume_ml(dose)})


