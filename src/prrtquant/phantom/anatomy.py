"""Synthetic abdominal anatomy in physical space (DICOM LPS, mm).

The anatomy lives in the *reference frame*: the scanner frame of the reference session, on
whose CT the masks are drawn. x points to the patient's left, y posterior, z superior.

Tissue is described by **exclusive regions** painted in order (a later region overwrites an
earlier one); every voxel centre therefore has exactly one label. The clinical **ROIs**
(liver, liver_left, lesion_1, ...) are sets of exclusive regions; their boundaries are
analytic (see :meth:`Anatomy.roi_shape`), which makes exact masks and exact contours possible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Iterable, Sequence

import numpy as np

from ..geometry import Grid, Rigid, euler_matrix
from .shapes import (
    Box,
    Difference,
    Ellipsoid,
    EllipticCylinder,
    HalfSpace,
    Intersection,
    Shape,
    Sphere,
    Union,
    flatten,
)

Array = np.ndarray

#: ROI names every tool of prrtquant speaks (ingest maps clinical names onto these).
CANONICAL_ORGANS = ("liver", "liver_left", "liver_right", "kidney_left", "kidney_right", "spleen", "bone_marrow")


@dataclass(frozen=True)
class Region:
    """One exclusive tissue region: painted in list order, later ones win."""

    name: str
    label: int
    shape: Shape
    tissue: str  # key into the per-tissue property tables (HU, MR, kinetics)


@dataclass(frozen=True)
class Deformation:
    """Smooth displacement d(a) = amplitude * exp(-|a - center|^2 / (2 sigma^2)), in mm.

    A session with a deformation sees the anatomy point ``a - d(a)`` at reference point ``a``:
    structures near ``center`` appear shifted by up to ``amplitude``.
    """

    center: tuple[float, float, float]
    sigma: float
    amplitude: tuple[float, float, float]

    def displacement(self, a: Array) -> Array:
        r2 = np.sum((a - np.asarray(self.center)) ** 2, axis=-1)
        return np.exp(-r2 / (2.0 * self.sigma**2))[..., None] * np.asarray(self.amplitude)

    @property
    def max_mm(self) -> float:
        return float(np.linalg.norm(self.amplitude))

    def to_dict(self) -> dict[str, object]:
        return {"center_mm": list(self.center), "sigma_mm": self.sigma, "amplitude_mm": list(self.amplitude)}


@dataclass
class Anatomy:
    regions: list[Region]
    rois: dict[str, list[str]]  # ROI name -> exclusive region names
    lesion_lobe: dict[str, str]  # lesion_N -> "left" | "right"
    lobe_plane: tuple[tuple[float, float, float], float]  # normal, offset: n·p <= d is the right lobe
    meta: dict[str, object] = field(default_factory=dict)

    # ------------------------------------------------------------------ lookup
    @property
    def by_name(self) -> dict[str, Region]:
        return {r.name: r for r in self.regions}

    @property
    def lesions(self) -> list[str]:
        return sorted((r for r in self.rois if r.startswith("lesion_")), key=lambda s: int(s.split("_")[1]))

    @property
    def extrahepatic(self) -> list[str]:
        return sorted((r for r in self.rois if r.startswith("extrahepatic_")), key=lambda s: int(s.split("_")[1]))

    def roi_labels(self, roi: str) -> list[int]:
        by = self.by_name
        return [by[n].label for n in self.rois[roi]]

    def roi_shape(self, roi: str) -> Shape:
        """Analytic solid of an ROI: its members minus every non-member painted after them."""
        members = self.rois[roi]
        order = [r.name for r in self.regions]
        first = min(order.index(m) for m in members)
        later = [r.shape for r in self.regions[first + 1:] if r.name not in members]
        plus = Union([self.by_name[m].shape for m in members])
        return Difference(plus, Union(later)) if later else plus

    # ------------------------------------------------------------------ rasterise
    def label_grid(self, grid: Grid, pose: Rigid | None = None, deformation: Deformation | None = None,
                   slab_voxels: int = 2_000_000) -> Array:
        """Exclusive labels at the voxel centres of ``grid`` (array z, y, x; uint8).

        ``pose`` maps the grid's (scanner) coordinates into the reference frame;
        ``deformation`` is applied after it. Each part of each region is evaluated only on the
        block of voxels its bounding box can reach, so cost follows organ size, not grid size.
        """
        nz, ny, nx = grid.shape_zyx
        out = np.zeros((nz, ny, nx), dtype=np.uint8)
        m = (pose or Rigid()).matrix
        minv = np.linalg.inv(m)
        pad = deformation.max_mm + 1.0 if deformation else 1.0
        size = np.asarray(grid.size)
        # reference point of voxel (i, j, k) = base + i*steps[:, 0] + j*steps[:, 1] + k*steps[:, 2]
        steps = m[:3, :3] @ grid.direction_matrix @ np.diag(grid.spacing)
        base = m[:3, :3] @ np.asarray(grid.origin) + m[:3, 3]
        for region in self.regions:
            for part in flatten(region.shape):
                lo, hi = part.bbox()
                if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))):
                    raise ValueError(f"region {region.name} has an unbounded part")
                lo, hi = lo - pad, hi + pad
                corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
                idx = grid.physical_to_index(corners @ minv[:3, :3].T + minv[:3, 3])
                i0 = np.clip(np.floor(idx.min(axis=0)).astype(int), 0, size)
                i1 = np.clip(np.ceil(idx.max(axis=0)).astype(int) + 1, 0, size)
                if np.any(i1 <= i0):
                    continue
                per_slice = int((i1[0] - i0[0]) * (i1[1] - i0[1]))
                step = max(1, slab_voxels // per_slice)
                ii = np.arange(i0[0], i1[0], dtype=np.float64)[None, None, :, None] * steps[:, 0]
                jj = np.arange(i0[1], i1[1], dtype=np.float64)[None, :, None, None] * steps[:, 1]
                for k0 in range(i0[2], i1[2], step):
                    k1 = min(i1[2], k0 + step)
                    kk = np.arange(k0, k1, dtype=np.float64)[:, None, None, None] * steps[:, 2] + base
                    a = ((kk + jj) + ii).reshape(-1, 3)  # reference-frame coordinates of the block
                    if deformation is not None:
                        a = a - deformation.displacement(a)
                    hit = (part.f(a) <= 0.0).reshape(k1 - k0, i1[1] - i0[1], i1[0] - i0[0])
                    block = out[k0:k1, i0[1]:i1[1], i0[0]:i1[0]]
                    block[hit] = region.label
        return out

    def roi_mask(self, labels: Array, roi: str) -> Array:
        return np.isin(labels, self.roi_labels(roi))

    # ------------------------------------------------------------------ truth
    @cached_property
    def region_volumes_ml(self) -> dict[str, float]:
        """Volumes of the organ and lesion regions (computed once, see :meth:`volumes_ml`)."""
        return self.volumes_ml()

    def volumes_ml(self, spacing_mm: float = 1.0) -> dict[str, float]:
        """Volume of every exclusive region by counting voxel centres of a fine grid.

        Spheres are returned analytically; other regions to ~0.3% at the default 1 mm (voxel-centre counting).
        """
        lo = np.min([r.shape.bbox()[0] for r in self.regions if np.all(np.isfinite(r.shape.bbox()[0]))], axis=0)
        hi = np.max([r.shape.bbox()[1] for r in self.regions if np.all(np.isfinite(r.shape.bbox()[1]))], axis=0)
        out: dict[str, float] = {}
        # only organs need numerical volumes; do them on their own bbox (background is not needed)
        fine_needed = [r for r in self.regions if r.tissue not in ("fat", "soft_tissue", "lung", "bone_cortical")]
        for r in fine_needed:
            if isinstance(r.shape, Sphere) and not self._overwritten(r):
                out[r.name] = r.shape.volume_ml
                continue
            rlo, rhi = r.shape.bbox()
            rlo, rhi = np.maximum(rlo, lo), np.minimum(rhi, hi)
            size = np.ceil((rhi - rlo) / spacing_mm).astype(int) + 1
            g = Grid(size=tuple(int(s) for s in size), spacing=(spacing_mm,) * 3,  # type: ignore[arg-type]
                     origin=tuple(float(v) for v in rlo))  # type: ignore[arg-type]
            lab = self.label_grid(g)
            out[r.name] = float(np.count_nonzero(lab == r.label)) * g.voxel_volume_ml
        return out

    def _overwritten(self, region: Region) -> bool:
        """True when a later region's bounding box touches this one (volume not analytic)."""
        order = [r.name for r in self.regions]
        lo, hi = region.shape.bbox()
        for r in self.regions[order.index(region.name) + 1:]:
            rlo, rhi = r.shape.bbox()
            if not (np.any(rhi < lo) or np.any(rlo > hi)):
                return True
        return False


# ---------------------------------------------------------------------- construction

#: Levels of the vertebral bodies: name -> centre z (mm) in the reference frame.
VERTEBRAE = {"T10": 79.0, "T11": 51.0, "T12": 23.0, "L1": -5.0, "L2": -33.0, "L3": -61.0, "L4": -89.0, "L5": -117.0}
MARROW_LEVELS = ("L2", "L3", "L4")


def build_anatomy(rng: np.random.Generator, n_lesions: int, n_extrahepatic: int,
                  min_lesions_per_lobe: int = 1, lesion_radius_mm: tuple[float, float] = (8.0, 15.0)) -> Anatomy:
    """Draw one patient's anatomy. Deterministic for a given ``rng`` state."""

    def jit(v: float, rel: float) -> float:
        return float(v * (1.0 + rng.uniform(-rel, rel)))

    def shift(c: Sequence[float], mm: float) -> tuple[float, float, float]:
        return tuple(float(x + rng.uniform(-mm, mm)) for x in c)  # type: ignore[return-value]

    bx, by = jit(150.0, 0.06), jit(100.0, 0.06)
    body = EllipticCylinder((0.0, 5.0), bx, by, -220.0, 220.0)
    fat_mm = 10.0
    inner = EllipticCylinder((0.0, 5.0), bx - fat_mm, by - fat_mm, -220.0, 220.0)

    lung_l = Ellipsoid(shift((75.0, 15.0, 165.0), 4), (55.0, 68.0, 95.0))
    lung_r = Ellipsoid(shift((-75.0, 15.0, 160.0), 4), (58.0, 70.0, 95.0))

    liver_c = shift((-42.0, -8.0, 45.0), 4)
    liver_e = Ellipsoid(liver_c, (jit(88.0, 0.05), jit(70.0, 0.05), jit(60.0, 0.05)),
                        tuple(map(tuple, euler_matrix((0.0, 0.0, rng.uniform(-8, 8))))))
    liver_raw = Intersection([liver_e, inner])
    # Cantlie-like plane: right lobe is n·p <= d (patient right is -x)
    n_plane = (1.0, -0.25, 0.0)
    d_plane = float(-25.0 + rng.uniform(-5, 5))
    right_half = HalfSpace(n_plane, d_plane)
    left_half = HalfSpace(tuple(-v for v in n_plane), -d_plane)

    spleen = Ellipsoid(shift((96.0, 32.0, 45.0), 4), (jit(30.0, 0.08), jit(24.0, 0.08), jit(48.0, 0.08)),
                       tuple(map(tuple, euler_matrix((0.0, 0.0, 30.0)))))
    kid_l = Ellipsoid(shift((72.0, 55.0, -42.0), 3), (26.0, 20.0, 46.0),
                      tuple(map(tuple, euler_matrix((0.0, 10.0, 15.0)))))
    kid_r = Ellipsoid(shift((-72.0, 55.0, -48.0), 3), (26.0, 20.0, 46.0),
                      tuple(map(tuple, euler_matrix((0.0, -10.0, -15.0)))))
    aorta = EllipticCylinder((16.0, 32.0), 11.0, 11.0, -150.0, 140.0)

    # bone: vertebral bodies (cortical shell + cancellous core), posterior elements, ribs
    # sub-voxel jitter of the skeleton keeps voxel centres off flat bone faces (no label ties)
    sdx, sdy, sdz = (float(v) for v in rng.uniform(-1.5, 1.5, 3))
    spine_xy, vb_r, vb_h = (sdx, 60.0 + sdy), 17.0, 24.0
    cortical_parts: list[Shape] = []
    cancellous_other: list[Shape] = []
    marrow: list[Shape] = []
    for name, zc0 in VERTEBRAE.items():
        zc = zc0 + sdz
        cortical_parts.append(EllipticCylinder(spine_xy, vb_r, vb_r * 0.85, zc - vb_h / 2, zc + vb_h / 2))
        cortical_parts.append(Box((sdx - 5.0, sdy + 78.0, zc - 9.0), (sdx + 5.0, sdy + 94.0, zc + 9.0)))  # spinous
        cortical_parts.append(Box((sdx - 36.0, sdy + 72.0, zc - 4.0), (sdx + 36.0, sdy + 80.0, zc + 4.0)))  # transverse
        cortical_parts.append(EllipticCylinder((sdx, sdy + 78.0), 14.0, 6.0, zc - 8.0, zc + 8.0))  # lamina / arch
        core = EllipticCylinder(spine_xy, vb_r - 3.0, vb_r * 0.85 - 3.0, zc - vb_h / 2 + 2.0, zc + vb_h / 2 - 2.0)
        (marrow if name in MARROW_LEVELS else cancellous_other).append(core)
    for zr0 in (12.0, 38.0, 64.0, 90.0, 116.0, 142.0):
        zr = zr0 + sdz
        ring = Difference(EllipticCylinder((0.0, 5.0), 0.93 * bx, 0.93 * by, zr - 4.0, zr + 4.0),
                          EllipticCylinder((0.0, 5.0), 0.87 * bx, 0.87 * by, zr - 5.0, zr + 5.0))
        cortical_parts.append(Intersection([ring, Box((-bx, -by, zr - 4.0), (bx, 2 * by, zr + 4.0)),
                                            Union([HalfSpace((1, 0, 0), -25.0), HalfSpace((-1, 0, 0), -25.0)])]))
    bone = Union(cortical_parts)

    regions: list[Region] = [
        Region("fat", 1, body, "fat"),
        Region("soft_tissue", 2, inner, "soft_tissue"),
        Region("lung_left", 3, lung_l, "lung"),
        Region("lung_right", 4, lung_r, "lung"),
        Region("liver_left_parenchyma", 6, Intersection([liver_raw, left_half]), "liver"),
        Region("liver_right_parenchyma", 7, Intersection([liver_raw, right_half]), "liver"),
        Region("spleen", 8, spleen, "spleen"),
        Region("kidney_left", 9, kid_l, "kidney"),
        Region("kidney_right", 10, kid_r, "kidney"),
        Region("aorta", 5, aorta, "blood"),
        Region("bone_cortical", 11, bone, "bone_cortical"),
        Region("cancellous_other", 12, Union(cancellous_other), "bone_marrow"),
        Region("bone_marrow_l2_l4", 13, Union(marrow), "bone_marrow"),
    ]

    # extrahepatic lesions: candidate sites, jittered, kept clear of every organ
    sites = [(-22.0, 30.0, -70.0), (30.0, -45.0, -60.0), (-40.0, -50.0, -95.0), (55.0, -20.0, -100.0)]
    order = rng.permutation(len(sites))
    occupied = Union([r.shape for r in regions[2:]])
    extra: list[Region] = []
    for si in order:
        if len(extra) >= n_extrahepatic:
            break
        for _ in range(50):
            r = float(rng.uniform(9.0, 13.0))
            c = shift(sites[si], 8)
            s = Sphere(c, r)
            if _clear_of(s, occupied, 4.0) and _inside(s, inner, 6.0):
                extra.append(Region(f"extrahepatic_{len(extra) + 1}", 20 + len(extra) + 1, s, "extrahepatic"))
                occupied = Union([occupied, s])
                break
    if len(extra) < n_extrahepatic:
        raise RuntimeError("could not place the extrahepatic lesions; try another seed")
    regions += extra

    # liver lesions: inside the liver ROI (clear of overlying organs and bone), away from the lobe plane
    tmp = Anatomy(regions=regions, rois={"liver": ["liver_left_parenchyma", "liver_right_parenchyma"]},
                  lesion_lobe={}, lobe_plane=(n_plane, d_plane))
    liver_roi = tmp.roi_shape("liver")
    plane = HalfSpace(n_plane, d_plane)
    lesions: list[Sphere] = []
    lobes: list[str] = []
    lo, hi = liver_e.bbox()
    want_left = max(min_lesions_per_lobe, n_lesions // 3)
    tries = 0
    while len(lesions) < n_lesions:
        tries += 1
        if tries > 20000:
            raise RuntimeError("could not place the liver lesions; try another seed")
        need_left = sum(1 for lb in lobes if lb == "left") < want_left
        need_right = sum(1 for lb in lobes if lb == "right") < min_lesions_per_lobe
        r = float(rng.uniform(*lesion_radius_mm))
        c = rng.uniform(lo, hi)
        s = Sphere(tuple(float(v) for v in c), r)
        side = "right" if float(plane.f(c[None, :])[0]) <= 0 else "left"
        remaining = n_lesions - len(lesions)
        if (need_left and side != "left" and remaining <= want_left - sum(lb == "left" for lb in lobes)) or (
                need_right and side != "right" and remaining <= 1):
            continue
        if abs(float(plane.f(c[None, :])[0])) < r + 5.0:
            continue
        if not _inside(s, liver_roi, 4.0):
            continue
        if any(np.linalg.norm(np.asarray(s.center) - np.asarray(o.center)) < s.radius + o.radius + 8.0 for o in lesions):
            continue
        lesions.append(s)
        lobes.append(side)
    # number lesions from superior to inferior, then by x, like a reader would
    order_l = sorted(range(len(lesions)), key=lambda i: (-lesions[i].center[2], lesions[i].center[0]))
    lesion_lobe: dict[str, str] = {}
    for n, i in enumerate(order_l, start=1):
        regions.append(Region(f"lesion_{n}", 40 + n, lesions[i], "lesion"))
        lesion_lobe[f"lesion_{n}"] = lobes[i]

    rois: dict[str, list[str]] = {
        "liver": ["liver_left_parenchyma", "liver_right_parenchyma"] + list(lesion_lobe),
        "liver_left": ["liver_left_parenchyma"] + [k for k, v in lesion_lobe.items() if v == "left"],
        "liver_right": ["liver_right_parenchyma"] + [k for k, v in lesion_lobe.items() if v == "right"],
        "kidney_left": ["kidney_left"],
        "kidney_right": ["kidney_right"],
        "spleen": ["spleen"],
        "bone_marrow": ["bone_marrow_l2_l4"],
    }
    for k in lesion_lobe:
        rois[k] = [k]
    for r in extra:
        rois[r.name] = [r.name]
    meta = {"body_semi_axes_mm": [bx, by], "fat_thickness_mm": fat_mm,
            "liver_center_mm": list(liver_c),
            "vertebrae_center_z_mm": {k: v + sdz for k, v in VERTEBRAE.items()},
            "bone_marrow_levels": list(MARROW_LEVELS)}
    return Anatomy(regions=regions, rois=rois, lesion_lobe=lesion_lobe,
                   lobe_plane=(n_plane, d_plane), meta=meta)


#: Derived ROIs that are reported in truth but not drawn as masks.
def healthy_rois(anat: Anatomy) -> dict[str, list[str]]:
    return {
        "healthy_liver": ["liver_left_parenchyma", "liver_right_parenchyma"],
        "healthy_liver_left": ["liver_left_parenchyma"],
        "healthy_liver_right": ["liver_right_parenchyma"],
    }


def _sphere_points(s: Sphere, pad: float, n: int = 200) -> Array:
    i = np.arange(n) + 0.5
    phi = np.arccos(1 - 2 * i / n)
    theta = math.pi * (1 + 5**0.5) * i
    u = np.stack([np.cos(theta) * np.sin(phi), np.sin(theta) * np.sin(phi), np.cos(phi)], axis=1)
    return np.asarray(s.center) + (s.radius + pad) * u


def _inside(s: Sphere, container: Shape, margin: float) -> bool:
    pts = np.vstack([_sphere_points(s, margin), np.asarray(s.center)[None, :]])
    return bool(np.all(container.f(pts) <= 0.0))


def _clear_of(s: Sphere, other: Shape, margin: float) -> bool:
    pts = np.vstack([_sphere_points(s, margin), _sphere_points(s, 0.0, 50), np.asarray(s.center)[None, :]])
    return bool(np.all(other.f(pts) > 0.0))


def iter_rois(anat: Anatomy) -> Iterable[str]:
    """Mask ROIs in a stable order: organs, lesions, extrahepatic."""
    yield from CANONICAL_ORGANS
    yield from anat.lesions
    yield from anat.extrahepatic
