"""Image grids and rigid transforms in DICOM patient coordinates (LPS, millimetres).

Everything in prrtquant lives in physical space. A :class:`Grid` is the geometry of a
SimpleITK image (size, spacing, origin, direction) without the pixels, so that the
phantom generator, the DICOM writers and the tests agree on where every voxel centre is.

>>> g = Grid(size=(10, 10, 10), spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0))
>>> g.voxel_volume_ml * g.n_voxels          # a 10 mm cube is exactly 1 mL
1.0
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import SimpleITK as sitk

Array = np.ndarray


@dataclass(frozen=True)
class Grid:
    """Geometry of a 3-D image: ``size`` is (x, y, z) like SimpleITK; arrays are (z, y, x)."""

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...] = field(default=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))

    @property
    def shape_zyx(self) -> tuple[int, int, int]:
        return (self.size[2], self.size[1], self.size[0])

    @property
    def n_voxels(self) -> int:
        return int(np.prod(self.size))

    @property
    def voxel_volume_ml(self) -> float:
        return float(np.prod(self.spacing)) / 1000.0

    @property
    def direction_matrix(self) -> Array:
        """Columns are the physical directions of the x, y and z index axes."""
        return np.asarray(self.direction, dtype=float).reshape(3, 3)

    def index_to_physical(self, ijk: Array) -> Array:
        """Continuous (i, j, k) indices (N×3, x fastest) to physical points (N×3)."""
        ijk = np.asarray(ijk, dtype=float)
        return (ijk * np.asarray(self.spacing)) @ self.direction_matrix.T + np.asarray(self.origin)

    def physical_to_index(self, xyz: Array) -> Array:
        xyz = np.asarray(xyz, dtype=float)
        return ((xyz - np.asarray(self.origin)) @ np.linalg.inv(self.direction_matrix).T) / np.asarray(
            self.spacing
        )

    def slice_points(self, k: int, i_range: tuple[int, int] | None = None,
                     j_range: tuple[int, int] | None = None) -> Array:
        """Physical centres of voxels of slice ``k`` as an array (nj, ni, 3)."""
        i0, i1 = i_range or (0, self.size[0])
        j0, j1 = j_range or (0, self.size[1])
        jj, ii = np.meshgrid(np.arange(j0, j1), np.arange(i0, i1), indexing="ij")
        ijk = np.stack([ii, jj, np.full_like(ii, k)], axis=-1).reshape(-1, 3)
        return self.index_to_physical(ijk).reshape(j1 - j0, i1 - i0, 3)

    def points_zyx(self, k_range: tuple[int, int] | None = None) -> Iterator[tuple[int, Array]]:
        """Yield (k, points(ny, nx, 3)) slice by slice; keeps memory at one slice."""
        k0, k1 = k_range or (0, self.size[2])
        for k in range(k0, k1):
            yield k, self.slice_points(k)

    def corners(self) -> Array:
        """Physical positions of the 8 extreme voxel centres."""
        s = np.asarray(self.size) - 1
        c = np.array([[i, j, k] for i in (0, s[0]) for j in (0, s[1]) for k in (0, s[2])], dtype=float)
        return self.index_to_physical(c)

    def refined(self, factor: int | tuple[int, int, int]) -> "Grid":
        """A grid whose voxels subdivide this grid's voxels ``factor`` times per axis (or (fx, fy, fz))."""
        f = np.broadcast_to(np.asarray(factor, dtype=int), (3,))
        sp = np.asarray(self.spacing) / f
        # first sub-voxel centre sits half a sub-voxel inside the parent voxel's corner
        offset = (-(f - 1) / 2.0) * sp
        origin = np.asarray(self.origin) + self.direction_matrix @ offset
        return Grid(
            size=tuple(int(s * k) for s, k in zip(self.size, f)),  # type: ignore[arg-type]
            spacing=tuple(float(v) for v in sp),  # type: ignore[arg-type]
            origin=tuple(float(v) for v in origin),  # type: ignore[arg-type]
            direction=self.direction,
        )

    def image(self, array_zyx: Array | None = None, pixel_id: int = sitk.sitkFloat32) -> sitk.Image:
        """A SimpleITK image on this grid (from a (z, y, x) array, or empty)."""
        if array_zyx is None:
            img = sitk.Image([int(v) for v in self.size], pixel_id)
        else:
            if tuple(array_zyx.shape) != self.shape_zyx:
                raise ValueError(f"array shape {array_zyx.shape} does not match grid {self.shape_zyx}")
            img = sitk.GetImageFromArray(array_zyx)
        img.SetSpacing([float(v) for v in self.spacing])
        img.SetOrigin([float(v) for v in self.origin])
        img.SetDirection([float(v) for v in self.direction])
        return img

    @classmethod
    def of(cls, img: sitk.Image) -> "Grid":
        return cls(
            size=tuple(int(v) for v in img.GetSize()),  # type: ignore[arg-type]
            spacing=tuple(float(v) for v in img.GetSpacing()),  # type: ignore[arg-type]
            origin=tuple(float(v) for v in img.GetOrigin()),  # type: ignore[arg-type]
            direction=tuple(float(v) for v in img.GetDirection()),
        )

    def to_dict(self) -> dict[str, list[float] | list[int]]:
        return {
            "size": list(self.size),
            "spacing": list(self.spacing),
            "origin": list(self.origin),
            "direction": list(self.direction),
        }


def voxel_volume_ml(image: sitk.Image) -> float:
    """Volume of one voxel of a SimpleITK image in mL (1 mL = 1000 mm³).

    >>> img = sitk.Image([2, 2, 2], sitk.sitkFloat32)
    >>> img.SetSpacing([10.0, 10.0, 10.0])
    >>> voxel_volume_ml(img)
    1.0
    """
    return float(np.prod(image.GetSpacing())) / 1000.0


def euler_matrix(angles_deg: Sequence[float]) -> Array:
    """Rotation matrix R = Rz @ Rx @ Ry for angles (about x, y, z) in degrees.

    This is SimpleITK's ``Euler3DTransform`` convention (ComputeZYX off: R = Rz Rx Ry).
    """
    ax, ay, az = np.deg2rad(np.asarray(angles_deg, dtype=float))
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ rx @ ry


@dataclass(frozen=True)
class Rigid:
    """Rigid map y = R (x - c) + c + t, as a 4×4 homogeneous matrix."""

    angles_deg: tuple[float, float, float] = (0.0, 0.0, 0.0)
    translation: tuple[float, float, float] = (0.0, 0.0, 0.0)
    center: tuple[float, float, float] = (0.0, 0.0, 0.0)

    @property
    def matrix(self) -> Array:
        r = euler_matrix(self.angles_deg)
        c = np.asarray(self.center, dtype=float)
        m = np.eye(4)
        m[:3, :3] = r
        m[:3, 3] = c + np.asarray(self.translation, dtype=float) - r @ c
        return m

    def apply(self, pts: Array) -> Array:
        m = self.matrix
        return np.asarray(pts, dtype=float) @ m[:3, :3].T + m[:3, 3]

    def inverse_apply(self, pts: Array) -> Array:
        m = np.linalg.inv(self.matrix)
        return np.asarray(pts, dtype=float) @ m[:3, :3].T + m[:3, 3]

    def to_sitk(self) -> sitk.Euler3DTransform:
        """The same map as a SimpleITK transform (maps points of its domain like :meth:`apply`)."""
        t = sitk.Euler3DTransform()
        t.SetCenter([float(v) for v in self.center])
        t.SetRotation(*[float(np.deg2rad(a)) for a in self.angles_deg])
        t.SetTranslation([float(v) for v in self.translation])
        return t

    @property
    def is_identity(self) -> bool:
        return not any(self.angles_deg) and not any(self.translation)
