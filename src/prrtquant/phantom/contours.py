"""Planar contours of analytic ROIs on the slices of an image grid (for RTSTRUCT)."""

from __future__ import annotations

import numpy as np
from skimage import measure

from ..geometry import Grid, Rigid
from .anatomy import Deformation
from .shapes import FAR, Shape, prune

Array = np.ndarray


def slice_contours(shape: Shape, grid: Grid, k: int, pose: Rigid | None = None,
                   deformation: Deformation | None = None, step_mm: float = 0.25,
                   tolerance_mm: float = 0.05) -> list[Array]:
    """Closed polygons (N×3, physical, in the grid's frame) where ``shape`` cuts slice ``k``.

    The implicit function is sampled on a ``step_mm`` lattice in the slice plane and its zero
    level traced with marching squares (sub-lattice accuracy), then simplified to within
    ``tolerance_mm``. Holes come out as separate polygons (even-odd rule applies).
    """
    m = (pose or Rigid()).matrix
    minv = np.linalg.inv(m)
    lo, hi = shape.bbox()
    pad = (deformation.max_mm if deformation else 0.0) + 2.0
    lo, hi = lo - pad, hi + pad
    corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    idx = grid.physical_to_index(corners @ minv[:3, :3].T + minv[:3, 3])
    imin, imax = idx.min(axis=0), idx.max(axis=0)
    if not (imin[2] - 1 <= k <= imax[2] + 1):
        return []
    sx, sy = grid.spacing[0], grid.spacing[1]
    u = np.arange(imin[0] * sx, imax[0] * sx + step_mm, step_mm) / sx  # continuous index along x
    v = np.arange(imin[1] * sy, imax[1] * sy + step_mm, step_mm) / sy
    vv, uu = np.meshgrid(v, u, indexing="ij")
    ijk = np.stack([uu.ravel(), vv.ravel(), np.full(uu.size, float(k))], axis=1)
    p = grid.index_to_physical(ijk)
    a = p @ m[:3, :3].T + m[:3, 3]
    if deformation is not None:
        a = a - deformation.displacement(a)
    local = prune(shape, a.min(axis=0) - 1.0, a.max(axis=0) + 1.0)
    if local is None:
        return []
    f = local.f(a).reshape(vv.shape)
    if not np.any(f <= 0):
        return []
    f = np.pad(f, 1, constant_values=FAR)  # closes contours at the lattice edge
    out: list[Array] = []
    for c in measure.find_contours(f, 0.0):
        c = measure.approximate_polygon(c, tolerance=tolerance_mm / step_mm)
        if len(c) > 1 and np.allclose(c[0], c[-1]):
            c = c[:-1]
        if len(c) < 3:
            continue
        rows, cols = c[:, 0] - 1.0, c[:, 1] - 1.0
        ci = np.interp(cols, np.arange(len(u)), u)
        cj = np.interp(rows, np.arange(len(v)), v)
        pts = grid.index_to_physical(np.stack([ci, cj, np.full(len(ci), float(k))], axis=1))
        out.append(pts)
    return out
