"""Exact rasterisation of RTSTRUCT contours onto an image grid.

A voxel belongs to an ROI when its centre lies inside the ROI's contours on that slice, with
several contours per slice combined by the even-odd rule (so holes work). The test is done in
physical space, so non-square images, any pixel spacing and any in-plane orientation are
handled (see shared PITFALLS on rt-utils' half-pixel growth and row/column transposition).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pydicom
from matplotlib.path import Path as MplPath

from .geometry import Grid

Array = np.ndarray


class MaskError(ValueError):
    """A structure set that cannot be placed on the image it should belong to."""


@dataclass(frozen=True)
class RoiInfo:
    number: int
    name: str
    interpreted_type: str


def rtstruct_rois(ds: pydicom.Dataset) -> list[RoiInfo]:
    types = {int(o.ReferencedROINumber): str(getattr(o, "RTROIInterpretedType", ""))
             for o in getattr(ds, "RTROIObservationsSequence", [])}
    return [RoiInfo(int(r.ROINumber), str(r.ROIName), types.get(int(r.ROINumber), ""))
            for r in ds.StructureSetROISequence]


def rasterize_rtstruct(ds: pydicom.Dataset, grid: Grid, slice_tolerance_mm: float | None = None,
                       source: str = "RTSTRUCT") -> dict[str, Array]:
    """Masks (z, y, x, bool) of every ROI of an RT Structure Set on ``grid``.

    Contours are matched to slices by their position along the slice normal (within half a
    slice spacing by default), not through ContourImageSequence, so contours that reference no
    image are not lost. A contour that lies on no slice of the grid raises :class:`MaskError`.
    """
    d = grid.direction_matrix
    normal = d[:, 2]
    tol = slice_tolerance_mm if slice_tolerance_mm is not None else 0.5 * grid.spacing[2]
    names = {r.number: r.name for r in rtstruct_rois(ds)}
    out: dict[str, Array] = {}
    nz, ny, nx = grid.shape_zyx
    for rc in getattr(ds, "ROIContourSequence", []):
        number = int(rc.ReferencedROINumber)
        name = names.get(number, f"ROI {number}")
        mask = np.zeros((nz, ny, nx), dtype=bool)
        for c in getattr(rc, "ContourSequence", []):
            if str(getattr(c, "ContourGeometricType", "CLOSED_PLANAR")) not in ("CLOSED_PLANAR", "CLOSEDPLANAR"):
                continue
            pts = np.asarray(c.ContourData, dtype=float).reshape(-1, 3)
            ijk = grid.physical_to_index(pts)
            kf = float(np.mean(ijk[:, 2]))
            k = int(round(kf))
            if abs(kf - k) * grid.spacing[2] > tol or not 0 <= k < nz:
                raise MaskError(f"{source}: contour of ROI '{name}' at {np.mean(pts @ normal):.2f} mm along the "
                                f"slice normal lies on no slice of the image grid")
            path = MplPath(ijk[:, :2])
            i0, j0 = np.floor(ijk[:, :2].min(axis=0)).astype(int)
            i1, j1 = np.ceil(ijk[:, :2].max(axis=0)).astype(int)
            i0, j0 = max(i0, 0), max(j0, 0)
            i1, j1 = min(i1, nx - 1), min(j1, ny - 1)
            if i1 < i0 or j1 < j0:
                raise MaskError(f"{source}: contour of ROI '{name}' lies outside the image in-plane")
            jj, ii = np.mgrid[j0:j1 + 1, i0:i1 + 1]
            inside = path.contains_points(np.stack([ii.ravel(), jj.ravel()], axis=1)).reshape(jj.shape)
            mask[k, j0:j1 + 1, i0:i1 + 1] ^= inside
        out[name] = mask
    return out
