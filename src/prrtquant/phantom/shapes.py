"""Implicit solids for the synthetic anatomy.

Each shape has ``f(points) -> values`` with ``f <= 0`` inside and, near the surface, ``|f|``
close to the distance in mm (exact for spheres, planes and slabs), plus an axis-aligned
bounding box. Solids combine by constructive solid geometry (``|``, ``&``, ``-``), so a
region's boundary is known analytically: voxel labels are exact at voxel centres and
RTSTRUCT contours are traced on the zero level set, not on a pixel staircase.

>>> s = Sphere((0, 0, 0), 10.0)
>>> float(s.f(np.array([[0.0, 0.0, 10.0]]))[0])
0.0
>>> round(Sphere((0, 0, 0), 10.0).volume_ml, 4)
4.1888
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

Array = np.ndarray
BBox = tuple[Array, Array]  # (lo, hi), each shape (3,)
FAR = 1.0e6  # value of f far outside a part (see Union.f)


class Shape:
    """Base class: subclasses implement ``f`` and ``bbox``."""

    def f(self, p: Array) -> Array:  # pragma: no cover - abstract
        raise NotImplementedError

    def bbox(self) -> BBox:  # pragma: no cover - abstract
        raise NotImplementedError

    def inside(self, p: Array) -> Array:
        return self.f(p) <= 0.0

    def __or__(self, other: "Shape") -> "Shape":
        return Union([self, other])

    def __and__(self, other: "Shape") -> "Shape":
        return Intersection([self, other])

    def __sub__(self, other: "Shape") -> "Shape":
        return Difference(self, other)


@dataclass(frozen=True)
class Sphere(Shape):
    center: Sequence[float]
    radius: float

    def f(self, p: Array) -> Array:
        return np.linalg.norm(p - np.asarray(self.center, dtype=float), axis=-1) - self.radius

    def bbox(self) -> BBox:
        c = np.asarray(self.center, dtype=float)
        return c - self.radius, c + self.radius

    @property
    def volume_ml(self) -> float:
        return 4.0 / 3.0 * math.pi * self.radius**3 / 1000.0


@dataclass(frozen=True)
class Ellipsoid(Shape):
    """Ellipsoid with semi-axes ``axes`` along the columns of rotation ``rot`` (3×3)."""

    center: Sequence[float]
    axes: Sequence[float]
    rot: tuple[tuple[float, ...], ...] = ((1, 0, 0), (0, 1, 0), (0, 0, 1))

    def f(self, p: Array) -> Array:
        r = np.asarray(self.rot, dtype=float)
        local = (p - np.asarray(self.center, dtype=float)) @ r
        q = np.sqrt(np.sum((local / np.asarray(self.axes, dtype=float)) ** 2, axis=-1))
        # scaled so |f| ~ distance near the surface along the shortest axis
        return (q - 1.0) * float(min(self.axes))

    def bbox(self) -> BBox:
        r = np.asarray(self.rot, dtype=float)
        a = np.asarray(self.axes, dtype=float)
        half = np.sqrt(((r * a[None, :]) ** 2).sum(axis=1))
        c = np.asarray(self.center, dtype=float)
        return c - half, c + half


@dataclass(frozen=True)
class EllipticCylinder(Shape):
    """Cylinder along z with elliptic cross-section (semi-axes ax, ay), z in [z0, z1]."""

    center_xy: Sequence[float]
    ax: float
    ay: float
    z0: float
    z1: float

    def f(self, p: Array) -> Array:
        cx, cy = self.center_xy
        q = np.sqrt(((p[..., 0] - cx) / self.ax) ** 2 + ((p[..., 1] - cy) / self.ay) ** 2)
        radial = (q - 1.0) * min(self.ax, self.ay)
        zc, hz = (self.z0 + self.z1) / 2.0, (self.z1 - self.z0) / 2.0
        axial = np.abs(p[..., 2] - zc) - hz
        return np.maximum(radial, axial)

    def bbox(self) -> BBox:
        cx, cy = self.center_xy
        return np.array([cx - self.ax, cy - self.ay, self.z0]), np.array([cx + self.ax, cy + self.ay, self.z1])


@dataclass(frozen=True)
class Box(Shape):
    lo: Sequence[float]
    hi: Sequence[float]

    def f(self, p: Array) -> Array:
        lo, hi = np.asarray(self.lo, dtype=float), np.asarray(self.hi, dtype=float)
        c, h = (lo + hi) / 2.0, (hi - lo) / 2.0
        return np.max(np.abs(p - c) - h, axis=-1)

    def bbox(self) -> BBox:
        return np.asarray(self.lo, dtype=float), np.asarray(self.hi, dtype=float)


@dataclass(frozen=True)
class HalfSpace(Shape):
    """Points with n·p <= d (n is normalised); unbounded, so only useful inside an intersection."""

    normal: Sequence[float]
    offset: float

    def f(self, p: Array) -> Array:
        n = np.asarray(self.normal, dtype=float)
        nn = np.linalg.norm(n)
        return (p @ (n / nn)) - self.offset / nn

    def bbox(self) -> BBox:
        return np.full(3, -np.inf), np.full(3, np.inf)


@dataclass(frozen=True)
class Union(Shape):
    parts: Sequence[Shape]

    def f(self, p: Array) -> Array:
        # Parts are evaluated only inside their (padded) bounding boxes; elsewhere a part is far
        # outside (its f is positive there anyway), so the zero level set is unchanged.
        out = np.full(p.shape[:-1], FAR)
        for s in self.parts:
            lo, hi = s.bbox()
            sel = np.all((p >= lo - 1.0) & (p <= hi + 1.0), axis=-1)
            if sel.all():
                out = np.minimum(out, s.f(p))
            elif sel.any():
                out[sel] = np.minimum(out[sel], s.f(p[sel]))
        return out

    def bbox(self) -> BBox:
        boxes = [s.bbox() for s in self.parts]
        return np.min([b[0] for b in boxes], axis=0), np.max([b[1] for b in boxes], axis=0)


def flatten(shape: Shape) -> list[Shape]:
    """The parts of nested unions (each with its own, tighter, bounding box)."""
    if isinstance(shape, Union):
        return [q for s in shape.parts for q in flatten(s)]
    return [shape]


@dataclass(frozen=True)
class Intersection(Shape):
    parts: Sequence[Shape]

    def f(self, p: Array) -> Array:
        out = self.parts[0].f(p)
        for s in self.parts[1:]:
            out = np.maximum(out, s.f(p))
        return out

    def bbox(self) -> BBox:
        boxes = [s.bbox() for s in self.parts]
        return np.max([b[0] for b in boxes], axis=0), np.min([b[1] for b in boxes], axis=0)


@dataclass(frozen=True)
class Difference(Shape):
    a: Shape
    b: Shape

    def f(self, p: Array) -> Array:
        return np.maximum(self.a.f(p), -self.b.f(p))

    def bbox(self) -> BBox:
        return self.a.bbox()


def _overlaps(box: BBox, lo: Array, hi: Array) -> bool:
    return not (np.any(box[1] < lo) or np.any(box[0] > hi))


def prune(shape: Shape, lo: Array, hi: Array) -> Shape | None:
    """The same solid restricted to the box [lo, hi]: parts that cannot reach it are dropped.

    Returns None when nothing of ``shape`` can lie in the box. Evaluating the pruned shape inside
    the box gives the same sign everywhere (and the same zero level set).
    """
    if isinstance(shape, Union):
        parts = [q for q in (prune(s, lo, hi) for s in shape.parts) if q is not None]
        if not parts:
            return None
        return parts[0] if len(parts) == 1 else Union(parts)
    if isinstance(shape, Intersection):
        parts = []
        for s in shape.parts:
            q = prune(s, lo, hi)
            if q is None:
                return None
            parts.append(q)
        return Intersection(parts)
    if isinstance(shape, Difference):
        a = prune(shape.a, lo, hi)
        if a is None:
            return None
        b = prune(shape.b, lo, hi)
        return a if b is None else Difference(a, b)
    return shape if _overlaps(shape.bbox(), lo, hi) else None
