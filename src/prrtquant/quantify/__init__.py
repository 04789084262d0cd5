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

from .endpoints import eligibility, enhancement_ratios, retreatment_fraction, sstr_positive, tumour_to_liver
from .lobes import assign_lobe, lobe_tn, paired_lobe_comparison
from .regions import EmptyRegionError, QuantifyError, check_same_grid, healthy_liver_mask, region_stats
from .suvpeak import sphere_radius_mm, suv_peak

__all__ = [
    "QuantifyError", "EmptyRegionError", "check_same_grid", "region_stats", "healthy_liver_mask",
    "sphere_radius_mm", "suv_peak", "enhancement_ratios", "eligibility", "tumour_to_liver", "sstr_positive",
    "retreatment_fraction", "lobe_tn", "assign_lobe", "paired_lobe_comparison",
]
