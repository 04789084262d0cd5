"""Exact rasterisation of RTSTRUCT contours onto an image grid, and their signed distance maps.

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
from scipy import ndimage
from scipy.interpolate import PchipInterpolator
from scipy.spatial import cKDTree

from ..errors import MaskError
from ..geometry import Grid

Array = np.ndarray


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


def contours_by_slice(ds: pydicom.Dataset, grid: Grid, slice_tolerance_mm: float | None = None,
                      source: str = "RTSTRUCT") -> dict[str, dict[int, list[Array]]]:
    """Closed planar contours of every ROI, per slice of ``grid``, as (n, 2) continuous (i, j) indices.

    Contours are matched to slices by their position along the slice normal (within half a slice
    spacing by default), not through ContourImageSequence, so contours that reference no image are
    not lost. A contour that lies on no slice of the grid raises :class:`MaskError`. ROIs without
    closed planar contours map to an empty dict.
    """
    tol = slice_tolerance_mm if slice_tolerance_mm is not None else 0.5 * grid.spacing[2]
    normal = grid.direction_matrix[:, 2]
    names = {r.number: r.name for r in rtstruct_rois(ds)}
    nz = grid.shape_zyx[0]
    out: dict[str, dict[int, list[Array]]] = {}
    for rc in getattr(ds, "ROIContourSequence", []):
        number = int(rc.ReferencedROINumber)
        name = names.get(number, f"ROI {number}")
        per_slice: dict[int, list[Array]] = out.setdefault(name, {})
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
            per_slice.setdefault(k, []).append(ijk[:, :2])
    return out


def rasterize_rtstruct(ds: pydicom.Dataset, grid: Grid, slice_tolerance_mm: float | None = None,
                       source: str = "RTSTRUCT") -> dict[str, Array]:
    """Masks (z, y, x, bool) of every ROI of an RT Structure Set on ``grid``.

    Contours are placed on slices as :func:`contours_by_slice` does. A contour that lies on no slice
    of the grid or outside the image in-plane raises :class:`MaskError`.
    """
    out: dict[str, Array] = {}
    nz, ny, nx = grid.shape_zyx
    for name, per_slice in contours_by_slice(ds, grid, slice_tolerance_mm, source).items():
        mask = np.zeros((nz, ny, nx), dtype=bool)
        for k, polys in per_slice.items():
            for ij in polys:
                path = MplPath(ij)
                i0, j0 = np.floor(ij.min(axis=0)).astype(int)
                i1, j1 = np.ceil(ij.max(axis=0)).astype(int)
                i0, j0 = max(i0, 0), max(j0, 0)
                i1, j1 = min(i1, nx - 1), min(j1, ny - 1)
                if i1 < i0 or j1 < j0:
                    raise MaskError(f"{source}: contour of ROI '{name}' lies outside the image in-plane")
                jj, ii = np.mgrid[j0:j1 + 1, i0:i1 + 1]
                inside = path.contains_points(np.stack([ii.ravel(), jj.ravel()], axis=1)).reshape(jj.shape)
                mask[k, j0:j1 + 1, i0:i1 + 1] ^= inside
        out[name] = mask
    return out


def _densify(polygon_mm: Array, step_mm: float) -> Array:
    """Points along a closed polygon's edges, at most ``step_mm`` apart (its vertices included)."""
    q = np.vstack([polygon_mm, polygon_mm[:1]])
    seg = np.diff(q, axis=0)
    n = np.maximum(1, np.ceil(np.hypot(seg[:, 0], seg[:, 1]) / step_mm)).astype(int)
    edge = np.repeat(np.arange(len(n)), n)
    frac = (np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)) / np.repeat(n, n)
    return q[edge] + seg[edge] * frac[:, None]


def contour_distance_maps(ds: pydicom.Dataset, grid: Grid, slice_tolerance_mm: float | None = None,
                          source: str = "RTSTRUCT", margin_mm: float = 10.0, clamp_mm: float = 10.0,
                          step_mm: float = 0.05, max_slice_mm: float | None = None,
                          volume_preserving: bool = False) -> dict[str, tuple[Array, Grid]]:
    """Signed distance to each ROI's contours (mm, negative inside), sampled on ``grid``'s slices.

    The drawn shape itself, without a voxel staircase: on every slice that carries contours, each
    voxel centre gets its in-plane distance to the nearest contour edge (edges sampled every
    ``step_mm``, so within ``step_mm``/2 of the exact distance), negative inside by the even-odd
    rule; farther than two pixels + 1 mm from the contours, where only the sign matters, the distance
    to the nearest pixel centre across the boundary (at most a pixel diagonal more). Linear
    interpolation of this map between slices is shape-based interpolation of the contours; its zero level is the surface that :func:`prrtquant.registration.propagate_mask`
    samples on another grid. Beyond the first and last contoured slice (and on a slice without
    contours inside the ROI's range), the empty slice gets ``|distance|`` of its contoured
    neighbour, so the surface closes half a slice beyond the end contours: the slab convention of a
    voxel-centre mask, but tapered along the last two contours (a sphere's cap is not a disc). With
    ``max_slice_mm``, slices are added between the contoured ones (monotone cubic interpolation, see
    :func:`_refine_slices`) until they are at most that far apart. With ``volume_preserving``, the map is
    shifted by the constant that makes the enclosed volume the contours' slab volume (sum of the
    contour areas × slice spacing, what a planning system reports): the caps' taper and the chords between
    slices otherwise lose 1–3 % of a small lesion's volume. Distances are clamped to ``clamp_mm``.

    Measured on spheres of 8–13 mm radius contoured like the phantom's (:mod:`prrtquant.phantom.contours`),
    as the volume between the sphere and this surface per unit area: 0.04–0.06 mm on 1 mm × 2 mm slices
    with the volume kept (0.07–0.11 mm without), 0.26–0.48 mm on 6 mm slices with ``max_slice_mm=2``
    (0.41–0.60 mm without); the surface of a voxel-centre mask on a 1 mm × 1 mm × 2 mm grid scatters by
    ~0.2 mm (SD) around the sphere.

    Returns ROI name -> (array (z, y, x) float32, the cropped grid it lives on): the ROI's contours
    plus ``margin_mm`` in-plane and two slices at each end; it may extend beyond ``grid``.
    ROIs without contours are left out.
    """
    sx, sy = grid.spacing[0], grid.spacing[1]
    scale = np.array([sx, sy])
    out: dict[str, tuple[Array, Grid]] = {}
    for name, per_slice in contours_by_slice(ds, grid, slice_tolerance_mm, source).items():
        if not per_slice:
            continue
        allpts = np.vstack([ij for polys in per_slice.values() for ij in polys])
        pad = np.ceil(margin_mm / scale).astype(int)
        i0, j0 = np.floor(allpts.min(axis=0)).astype(int) - pad
        i1, j1 = np.ceil(allpts.max(axis=0)).astype(int) + pad
        k0, k1 = min(per_slice) - 2, max(per_slice) + 2
        jj, ii = np.mgrid[j0:j1 + 1, i0:i1 + 1]
        centres = np.stack([ii.ravel() * sx, jj.ravel() * sy], axis=1)
        phi = np.full((k1 - k0 + 1, j1 - j0 + 1, i1 - i0 + 1), clamp_mm, dtype=np.float32)
        band = 2.0 * max(sx, sy) + 1.0  # exact within this distance (the zero level and the fractional band)
        for k, polys in per_slice.items():
            mm = [ij * scale for ij in polys]
            inside = np.zeros(len(centres), dtype=bool)
            for p in mm:
                inside ^= MplPath(p).contains_points(centres)
            inside_2d = inside.reshape(jj.shape)
            # farther out, the distance to the nearest pixel centre across the boundary (within a pixel)
            d = np.where(inside_2d, ndimage.distance_transform_edt(inside_2d, sampling=(sy, sx)),
                         ndimage.distance_transform_edt(~inside_2d, sampling=(sy, sx))).ravel()
            near = d <= band + max(sx, sy)
            tree = cKDTree(np.vstack([_densify(p, step_mm) for p in mm]))
            d[near] = np.minimum(tree.query(centres[near], distance_upper_bound=2.0 * band)[0], d[near])
            d = np.minimum(d, clamp_mm)
            phi[k - k0] = np.where(inside, -d, d).reshape(jj.shape)
        for k in range(k0 + 1, k1):
            if k in per_slice:
                continue
            ends = []
            for n, step in ((k - 1, -1), (k + 1, 1)):
                if n not in per_slice:
                    continue
                end = np.abs(phi[n - k0])
                if n + step in per_slice:  # taper along the last two contours, within the half slice
                    end = np.maximum(end, 2.0 * phi[n - k0] - phi[n + step - k0])
                ends.append(end)
            if ends:
                phi[k - k0] = np.minimum.reduce(ends)
        origin = grid.index_to_physical(np.array([[i0, j0, k0]], dtype=float))[0]
        sub = Grid(size=(int(i1 - i0 + 1), int(j1 - j0 + 1), int(k1 - k0 + 1)), spacing=grid.spacing,
                   origin=tuple(float(v) for v in origin), direction=grid.direction)  # type: ignore[arg-type]
        factor = 1 if max_slice_mm is None else int(np.ceil(grid.spacing[2] / max_slice_mm - 1e-6))
        if factor > 1:
            phi, sub = _refine_slices(phi, sub, sorted(k - k0 for k in per_slice), factor)
        if volume_preserving:
            slab = sum(_even_odd_area([ij * scale for ij in polys]) for polys in per_slice.values()) * grid.spacing[2]
            phi = phi - np.float32(_level_for_volume(phi, sub, slab))
        out[name] = (phi, sub)
    return out


def _refine_slices(phi: Array, grid: Grid, contoured: list[int], factor: int) -> tuple[Array, Grid]:
    """``factor`` slices per slice: between contoured slices of a run of three or more, monotone cubic
    (PCHIP) interpolation along the slice axis, which follows a curved surface between distant slices
    (linear interpolation cuts its chord: ~0.45 mm at the equator of a 10 mm sphere on 6 mm slices);
    elsewhere (end gaps, short runs) linear, keeping the end convention of :func:`contour_distance_maps`."""
    nz = phi.shape[0]
    z = np.arange((nz - 1) * factor + 1) / factor
    lo = np.minimum(np.floor(z).astype(int), nz - 2)
    w = (z - lo)[:, None, None]
    out = ((1.0 - w) * phi[lo] + w * phi[lo + 1]).astype(np.float32)
    runs: list[list[int]] = []
    for k in contoured:
        if runs and k == runs[-1][-1] + 1:
            runs[-1].append(k)
        else:
            runs.append([k])
    for run in runs:
        if len(run) < 3:
            continue
        sel = (z >= run[0]) & (z <= run[-1])
        out[sel] = PchipInterpolator(np.asarray(run, dtype=float), phi[run[0]:run[-1] + 1], axis=0)(z[sel])
    sp = (grid.spacing[0], grid.spacing[1], grid.spacing[2] / factor)
    return out, Grid(size=(grid.size[0], grid.size[1], len(z)), spacing=sp, origin=grid.origin,
                     direction=grid.direction)


def _even_odd_area(polygons: list[Array]) -> float:
    """Area (mm²) enclosed by closed polygons combined by the even-odd rule (a polygon inside an odd
    number of others is a hole)."""
    total = 0.0
    for i, p in enumerate(polygons):
        a = 0.5 * abs(float(np.dot(p[:, 0], np.roll(p[:, 1], -1)) - np.dot(p[:, 1], np.roll(p[:, 0], -1))))
        depth = sum(bool(MplPath(q).contains_point(p[0])) for j, q in enumerate(polygons) if j != i)
        total += a if depth % 2 == 0 else -a
    return total


def _level_for_volume(phi: Array, grid: Grid, volume_mm3: float, n_points: int = 1_000_000,
                      band_mm: float = 2.0) -> float:
    """Level c such that {phi <= c} (trilinear) encloses ``volume_mm3``.

    Cells between voxel centres whose eight corners are all below -``band_mm`` count as inside, all above
    as outside; the others are measured by stratified sampling (fixed seed: the same number of
    uniformly jittered points in each). Valid for |c| < ``band_mm`` (else the whole crop is sampled)."""
    cell_mm3 = float(np.prod(grid.spacing))
    corners = [phi[z:z + phi.shape[0] - 1, y:y + phi.shape[1] - 1, x:x + phi.shape[2] - 1]
               for z in (0, 1) for y in (0, 1) for x in (0, 1)]
    lo, hi = np.minimum.reduce(corners), np.maximum.reduce(corners)
    for band in (band_mm, np.inf):
        core = hi <= -band
        cells = np.argwhere(~core & (lo < band)).T
        per = max(1, n_points // max(cells.shape[1], 1))
        pts = np.repeat(cells, per, axis=1) + np.random.default_rng(12345).uniform(0.0, 1.0, (3, cells.shape[1] * per))
        vals = ndimage.map_coordinates(phi, pts, order=1, mode="nearest")
        # points of the sampled cells that must be inside
        k = int(round((volume_mm3 / cell_mm3 - float(core.sum())) * per))
        if not 1 <= k <= vals.size - 1:
            continue
        part = np.partition(vals, (k - 1, k))
        c = 0.5 * (float(part[k - 1]) + float(part[k]))
        if abs(c) < 0.5 * band:
            return c
    raise ValueError("the requested volume does not fit the distance map's crop")
