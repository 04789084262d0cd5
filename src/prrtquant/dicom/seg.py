"""Decode DICOM Segmentation objects (SEG) onto the grid of the image they were drawn on.

A SEG stores each segment as a set of 2-D frames. Which slice of the source image a frame belongs
to is given only by its geometry: ``PerFrameFunctionalGroupsSequence`` → ``PlanePositionSequence``
→ ``ImagePositionPatient`` for the position of its first pixel, and ``PlaneOrientationSequence``
(per-frame or shared) for the direction of its rows and columns. Frame order in the file, the
order of the referenced instances and the ``DimensionIndexValues`` carry no geometric meaning and
are ignored here: every frame is placed on the target :class:`~prrtquant.geometry.Grid` by
converting its position to a grid index.

:func:`read_seg` checks, for every frame, that

* its rows and columns run along the grid's x and y axes (orientation) and its pixel spacing is
  the grid's in-plane spacing;
* its plane coincides with a slice of the grid (distance along the slice axis at most the
  tolerance) and its first pixel lies on a voxel centre of that slice (in-plane distance at most
  the tolerance);
* all of its pixels fall inside the grid;
* no two frames of one segment land on the same slice;

and raises :class:`SegError` (naming the file, the segment and the position) otherwise.

Pixel decoding (including bit-packed BINARY frames whose size is not a multiple of 8 bits, and
compressed transfer syntaxes) is done by :func:`highdicom.seg.segread`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from prrtquant.geometry import Grid

from ..errors import SegError

__all__ = ["SegError", "SegSegment", "read_seg"]

#: Largest angle (radians) between a frame's row/column direction and the grid's x/y axis that is
#: still accepted as "the same orientation" (about 0.06°; DICOM direction cosines written with
#: six decimals differ from the exact ones by ~1e-6).
ORIENTATION_TOL_RAD = 1e-3
#: Largest relative difference between a frame's pixel spacing and the grid's in-plane spacing.
SPACING_RTOL = 1e-3

_SUPPORTED_TYPES = ("BINARY", "FRACTIONAL")


@dataclass(frozen=True)
class SegSegment:
    """One segment of a SEG, decoded onto a grid.

    ``mask`` has the grid's (z, y, x) shape: ``bool`` for a BINARY SEG, ``float32`` in [0, 1]
    (stored value / ``MaximumFractionalValue``) for a FRACTIONAL SEG. Slices for which the SEG holds
    no frame of this segment are empty (False / 0.0).
    """

    number: int
    label: str
    mask: np.ndarray

    @property
    def n_voxels(self) -> int:
        """Number of voxels in the segment (non-zero voxels for a fractional mask)."""
        return int(np.count_nonzero(self.mask))


@dataclass(frozen=True)
class _FramePlane:
    """Where one frame goes on the grid: slice ``k``, first pixel at column ``i0``, row ``j0``."""

    k: int
    i0: int
    j0: int


def _item(seq_owner: Dataset | None, keyword: str) -> Dataset | None:
    """First item of sequence ``keyword`` in ``seq_owner`` (None when absent or empty)."""
    if seq_owner is None or keyword not in seq_owner:
        return None
    seq = seq_owner[keyword].value
    return seq[0] if len(seq) else None


def _frame_attr(per_frame: Dataset | None, shared: Dataset | None, seq_kw: str, attr: str) -> Any:
    """Attribute ``attr`` of functional group ``seq_kw``, per-frame first, then shared."""
    for owner in (per_frame, shared):
        item = _item(owner, seq_kw)
        if item is not None and attr in item and item[attr].value is not None:
            return item[attr].value
    return None


def _fmt(v: np.ndarray | list[float]) -> str:
    return "(" + ", ".join(f"{float(x):.3f}" for x in v) + ")"


def _default_tolerance(grid: Grid) -> float:
    return 0.5 * float(grid.spacing[2])


def _check_orientation(name: str, where: str, iop: np.ndarray, grid: Grid, rows: int, cols: int,
                       pixel_spacing: tuple[float, float], tol: float) -> None:
    """Raise unless the frame's rows/columns run along the grid's x/y axes with the grid's spacing."""
    d = grid.direction_matrix
    gx, gy = d[:, 0] / np.linalg.norm(d[:, 0]), d[:, 1] / np.linalg.norm(d[:, 1])
    r, c = iop[:3], iop[3:]
    if not (np.isfinite(iop).all() and np.linalg.norm(r) > 0 and np.linalg.norm(c) > 0):
        raise SegError(f"{name}: {where} has an invalid ImageOrientationPatient {list(iop)}")
    r, c = r / np.linalg.norm(r), c / np.linalg.norm(c)
    # angle between unit vectors, robust for small angles
    ang_r = 2.0 * np.arcsin(min(1.0, np.linalg.norm(r - gx) / 2.0))
    ang_c = 2.0 * np.arcsin(min(1.0, np.linalg.norm(c - gy) / 2.0))
    # how far the far edge of the frame would move because of the rotation
    drift = max(np.linalg.norm(r - gx) * (cols - 1) * pixel_spacing[1],
                np.linalg.norm(c - gy) * (rows - 1) * pixel_spacing[0])
    if max(ang_r, ang_c) > ORIENTATION_TOL_RAD or drift > tol:
        raise SegError(
            f"{name}: {where} has orientation rows {_fmt(r)}, columns {_fmt(c)} but the grid's "
            f"x/y axes are {_fmt(gx)}, {_fmt(gy)} (frame orientation differs from the grid's)"
        )
    sx, sy = float(grid.spacing[0]), float(grid.spacing[1])
    row_sp, col_sp = pixel_spacing  # DICOM PixelSpacing = (between rows, between columns) = (y, x)
    spacing_drift = max(abs(col_sp - sx) * (cols - 1), abs(row_sp - sy) * (rows - 1))
    if (abs(col_sp - sx) > SPACING_RTOL * sx or abs(row_sp - sy) > SPACING_RTOL * sy
            or spacing_drift > tol):
        raise SegError(
            f"{name}: {where} has pixel spacing (x {col_sp:g}, y {row_sp:g}) mm but the grid's is "
            f"(x {sx:g}, y {sy:g}) mm"
        )


def _place(name: str, where: str, ipp: np.ndarray, grid: Grid, rows: int, cols: int,
           tol: float) -> _FramePlane:
    """Grid slice and in-plane offset of a frame whose first pixel centre is at ``ipp``."""
    ijk = grid.physical_to_index(ipp[None, :])[0]
    nearest = np.rint(ijk)
    i0, j0, k = (int(v) for v in nearest)
    sx, sy, sz = (float(s) for s in grid.spacing)
    off_plane = abs(ijk[2] - nearest[2]) * sz
    in_plane = float(np.hypot((ijk[0] - nearest[0]) * sx, (ijk[1] - nearest[1]) * sy))
    nx, ny, nz = grid.size
    pos = f"position {_fmt(ipp)} mm (grid index {_fmt(ijk)})"
    if not 0 <= k < nz:
        raise SegError(
            f"{name}: {where} at {pos} does not coincide with any slice of the grid: it lies "
            f"outside the grid's {nz} slices (nearest slice index {k})"
        )
    if off_plane > tol:
        raise SegError(
            f"{name}: {where} at {pos} does not coincide with any slice of the grid "
            f"(distance to the nearest slice plane {off_plane:.3f} mm, slices {sz:g} mm apart, "
            f"tolerance {tol:g} mm)"
        )
    if in_plane > tol:
        raise SegError(
            f"{name}: {where} at {pos} is {in_plane:.3f} mm off the grid's voxel centres in-plane "
            f"(tolerance {tol:g} mm)"
        )
    if i0 < 0 or j0 < 0 or i0 + cols > nx or j0 + rows > ny:
        raise SegError(
            f"{name}: {where} at {pos} covers columns {i0}..{i0 + cols - 1}, rows {j0}..{j0 + rows - 1} "
            f"but the grid has {nx} columns and {ny} rows"
        )
    return _FramePlane(k=k, i0=i0, j0=j0)


def _open_seg(path: Path, name: str) -> hd.seg.Segmentation:
    """The SEG read by :func:`highdicom.seg.segread`; anything but a missing file becomes SegError."""
    try:
        return hd.seg.segread(path)
    except FileNotFoundError:
        raise
    except Exception as exc:  # highdicom/pydicom raise a variety of errors for non-SEG input
        raise SegError(f"{name}: not a readable DICOM Segmentation ({type(exc).__name__}: {exc})") from exc


def _segmentation_type(seg: hd.seg.Segmentation, name: str) -> tuple[bool, float]:
    """(fractional, MaximumFractionalValue or 1.0) of a BINARY or FRACTIONAL SEG; other types refused."""
    seg_type = str(seg.get("SegmentationType", ""))
    if seg_type not in _SUPPORTED_TYPES:
        raise SegError(f"{name}: SegmentationType {seg_type or '(missing)'!r} is not supported "
                       f"(only {', '.join(_SUPPORTED_TYPES)})")
    fractional = seg_type == "FRACTIONAL"
    max_value = 1.0
    if fractional:
        max_value = float(seg.get("MaximumFractionalValue", 0) or 0)
        if max_value <= 0:
            raise SegError(f"{name}: FRACTIONAL SEG without a positive MaximumFractionalValue")
    return fractional, max_value


def _per_frame_groups(seg: hd.seg.Segmentation, name: str) -> DicomSequence:
    """PerFrameFunctionalGroupsSequence, refused unless it has one item per frame."""
    per_frame_seq = seg.get("PerFrameFunctionalGroupsSequence")
    n_frames = int(seg.get("NumberOfFrames", 1))
    if per_frame_seq is None or len(per_frame_seq) != n_frames:
        raise SegError(
            f"{name}: PerFrameFunctionalGroupsSequence has "
            f"{0 if per_frame_seq is None else len(per_frame_seq)} items for {n_frames} frames"
        )
    return per_frame_seq


def _segment_labels(seg: hd.seg.Segmentation, name: str) -> dict[int, str]:
    """SegmentNumber -> SegmentLabel, in the order of SegmentSequence; duplicates or none refused."""
    labels: dict[int, str] = {}
    for item in seg.get("SegmentSequence", []):
        number = int(item.SegmentNumber)
        if number in labels:
            raise SegError(f"{name}: segment number {number} is described twice in SegmentSequence")
        labels[number] = str(item.get("SegmentLabel", ""))
    if not labels:
        raise SegError(f"{name}: SegmentSequence is empty")
    return labels


def _referenced_segment(name: str, fg: Dataset, shared: Dataset | None, frame_number: int,
                        labels: dict[int, str]) -> int:
    """The described segment a frame belongs to (ReferencedSegmentNumber, per-frame first, then shared)."""
    ident = _item(fg, "SegmentIdentificationSequence") or _item(shared, "SegmentIdentificationSequence")
    if ident is None or "ReferencedSegmentNumber" not in ident:
        raise SegError(f"{name}: frame {frame_number} has no ReferencedSegmentNumber")
    number = int(ident.ReferencedSegmentNumber)
    if number not in labels:
        raise SegError(f"{name}: frame {frame_number} refers to segment {number}, which is not in "
                       f"SegmentSequence (segments {sorted(labels)})")
    return number


def _frame_geometry(name: str, where: str, fg: Dataset, shared: Dataset | None
                    ) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    """(ImagePositionPatient, ImageOrientationPatient, PixelSpacing) of a frame, per-frame before shared."""
    ipp = _frame_attr(fg, shared, "PlanePositionSequence", "ImagePositionPatient")
    iop = _frame_attr(fg, shared, "PlaneOrientationSequence", "ImageOrientationPatient")
    spacing = _frame_attr(fg, shared, "PixelMeasuresSequence", "PixelSpacing")
    if ipp is None or len(ipp) != 3:
        raise SegError(f"{name}: {where} has no ImagePositionPatient in PlanePositionSequence")
    if iop is None or len(iop) != 6:
        raise SegError(f"{name}: {where} has no ImageOrientationPatient in PlaneOrientationSequence")
    if spacing is None or len(spacing) != 2:
        raise SegError(f"{name}: {where} has no PixelSpacing in PixelMeasuresSequence")
    ipp_a = np.asarray([float(v) for v in ipp])
    iop_a = np.asarray([float(v) for v in iop])
    return ipp_a, iop_a, (float(spacing[0]), float(spacing[1]))


def _fill_frame(name: str, where: str, seg: hd.seg.Segmentation, frame_number: int, target: np.ndarray,
                fractional: bool, max_value: float) -> None:
    """Decode frame ``frame_number`` into ``target`` (a (rows, cols) view of a mask): bool, or value / max."""
    rows, cols = target.shape
    frame = np.asarray(seg.get_stored_frame(frame_number))
    if frame.shape != (rows, cols):
        raise SegError(f"{name}: frame {frame_number} decodes to shape {frame.shape}, "
                       f"expected ({rows}, {cols})")
    if fractional:
        if frame.size and (frame.min() < 0 or frame.max() > max_value):
            raise SegError(f"{name}: {where} has values outside 0..{max_value:g} "
                           f"(MaximumFractionalValue)")
        target[...] = frame.astype(np.float32) / np.float32(max_value)
    else:
        target[...] = frame != 0


def read_seg(path: str | Path, grid: Grid, tolerance_mm: float | None = None) -> list[SegSegment]:
    """Every segment of the SEG at ``path`` on ``grid`` (the referenced image's grid).

    Frames are placed by their physical position (``ImagePositionPatient`` of the per-frame
    ``PlanePositionSequence``, orientation from the per-frame or shared
    ``PlaneOrientationSequence``), never by their order in the file.

    Parameters
    ----------
    path:
        A DICOM Segmentation Storage file with ``SegmentationType`` BINARY or FRACTIONAL.
    grid:
        Geometry of the image the SEG was drawn on; the masks have its (z, y, x) shape.
    tolerance_mm:
        How far (mm) a frame's plane may be from the grid slice it is put on, and how far its first
        pixel centre may be from a grid voxel centre in-plane. Default: half the grid's slice
        spacing. It also bounds how much a (tiny) difference in orientation or pixel spacing may
        displace the far edge of a frame.

    Returns
    -------
    list[SegSegment]
        One entry per item of ``SegmentSequence``, in the order of that sequence. Masks are
        ``bool`` for BINARY, ``float32`` in [0, 1] (value / ``MaximumFractionalValue``) for
        FRACTIONAL.

    Raises
    ------
    SegError
        If the file is not a readable BINARY/FRACTIONAL SEG, if a frame's orientation or pixel
        spacing differs from the grid's, if a frame's plane does not coincide with a slice of the
        grid (within tolerance) or its pixels fall outside the grid, if a frame refers to a segment
        that is not described, or if two frames of one segment fall on the same slice. The message
        names the file, the segment and the position.
    """
    path = Path(path)
    name = str(path)  # every message starts with the file it is about
    tol = _default_tolerance(grid) if tolerance_mm is None else float(tolerance_mm)
    if not np.isfinite(tol) or tol < 0:
        raise ValueError(f"tolerance_mm must be a non-negative number, got {tolerance_mm!r}")

    seg = _open_seg(path, name)
    fractional, max_value = _segmentation_type(seg, name)
    rows, cols = int(seg.Rows), int(seg.Columns)
    shared = _item(seg, "SharedFunctionalGroupsSequence")
    per_frame_seq = _per_frame_groups(seg, name)
    labels = _segment_labels(seg, name)

    dtype = np.float32 if fractional else np.bool_
    masks = {n: np.zeros(grid.shape_zyx, dtype=dtype) for n in labels}
    filled: dict[tuple[int, int], int] = {}  # (segment, slice k) -> 1-based frame number
    checked_geometry: set[tuple[float, ...]] = set()

    for index, fg in enumerate(per_frame_seq):
        frame_number = index + 1
        number = _referenced_segment(name, fg, shared, frame_number, labels)
        where = f"frame {frame_number} of segment {number} ({labels[number]!r})"
        ipp_a, iop_a, sp = _frame_geometry(name, where, fg, shared)

        key = (*iop_a.tolist(), *sp)
        if key not in checked_geometry:
            _check_orientation(name, where, iop_a, grid, rows, cols, sp, tol)
            checked_geometry.add(key)
        plane = _place(name, where, ipp_a, grid, rows, cols, tol)

        if (number, plane.k) in filled:
            raise SegError(
                f"{name}: {where} at position {_fmt(ipp_a)} mm falls on grid slice {plane.k}, "
                f"which frame {filled[(number, plane.k)]} of the same segment already occupies"
            )
        filled[(number, plane.k)] = frame_number
        target = masks[number][plane.k, plane.j0:plane.j0 + rows, plane.i0:plane.i0 + cols]
        _fill_frame(name, where, seg, frame_number, target, fractional, max_value)

    return [SegSegment(number=n, label=labels[n], mask=masks[n]) for n in labels]
