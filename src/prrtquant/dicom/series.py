"""Per-slice DICOM series (CT, PT, MR) as physical images: sorting, geometry checks, pixel values.

Slices are ordered by their position along the slice normal (row × column direction), never by
file name or InstanceNumber. Missing slices, uneven spacing, mixed orientations and duplicate
positions are errors that name the series and the slices involved; sub-0.1 mm jitter of
multi-bed scanners is tolerated (see shared PITFALLS).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pydicom

from ..errors import SeriesError
from ..geometry import Grid

Array = np.ndarray


@dataclass(frozen=True)
class SlicedSeries:
    datasets: list[pydicom.Dataset]  # with pixel data, in slice order (k = 0 first)
    paths: list[Path]
    grid: Grid


def _orientation(ds: pydicom.Dataset, path: Path) -> Array:
    if "ImageOrientationPatient" not in ds or "ImagePositionPatient" not in ds:
        raise SeriesError(f"{path}: ImageOrientationPatient/ImagePositionPatient missing")
    return np.asarray(ds.ImageOrientationPatient, dtype=float)


def load_sliced_series(paths: Sequence[Path], series_uid: str, rel_tol: float = 0.01,
                       abs_tol_mm: float = 0.1) -> SlicedSeries:
    """Read the slices of one series, sort them along the normal and check the spacing."""
    items = []
    for p in paths:
        try:
            ds = pydicom.dcmread(p)
            _ = ds.pixel_array  # decodes (and caches) now, so a short PixelData is caught here
        except Exception as exc:  # noqa: BLE001 - any read failure is reported with the file
            raise SeriesError(f"{p}: unreadable or truncated DICOM file in series {series_uid} ({exc})") from exc
        items.append((p, ds))
    iop0 = _orientation(items[0][1], items[0][0])
    row, col = iop0[:3], iop0[3:]
    normal = np.cross(row, col)
    for p, ds in items:
        if not np.allclose(_orientation(ds, p), iop0, atol=1e-4):
            raise SeriesError(f"{p}: ImageOrientationPatient differs from the rest of series {series_uid}")
        if (int(ds.Rows), int(ds.Columns)) != (int(items[0][1].Rows), int(items[0][1].Columns)):
            raise SeriesError(f"{p}: image size differs from the rest of series {series_uid}")
    pos = np.array([np.asarray(ds.ImagePositionPatient, dtype=float) for _, ds in items])
    d = pos @ normal
    order = np.argsort(d, kind="stable")
    items = [items[i] for i in order]
    d, pos = d[order], pos[order]
    ps = _numbers(items[0][1], "PixelSpacing", items[0][0])  # row spacing (y), column spacing (x)
    if ps is None or len(ps) != 2 or min(ps) <= 0:
        raise SeriesError(f"{items[0][0]}: PixelSpacing missing or not two positive numbers in series {series_uid}")
    if len(items) == 1:
        dz = float(getattr(items[0][1], "SpacingBetweenSlices", 0) or getattr(items[0][1], "SliceThickness", 0) or 1.0)
    else:
        gaps = np.diff(d)
        if np.any(gaps < abs_tol_mm):
            i = int(np.argmin(gaps))
            raise SeriesError(f"series {series_uid}: two slices at the same position {d[i]:.2f} mm "
                              f"({items[i][0].name}, {items[i + 1][0].name})")
        dz = float(np.median(gaps))
        tol = max(abs_tol_mm, rel_tol * dz)
        for i, g in enumerate(gaps):
            if abs(g - dz) > tol:
                what = "missing slice" if abs(g / dz - round(g / dz)) * dz <= tol and round(g / dz) >= 2 \
                    else "uneven slice spacing"
                raise SeriesError(f"series {series_uid}: {what}: gap of {g:.3f} mm instead of {dz:.3f} mm between "
                                  f"{items[i][0]} and {items[i + 1][0]}")
        # positions must lie on one line along the normal (no in-plane drift)
        drift = pos - pos[0] - np.outer(d - d[0], normal)
        if np.max(np.abs(drift)) > tol:
            raise SeriesError(f"series {series_uid}: slice positions drift in-plane by {np.max(np.abs(drift)):.3f} mm")
    _check_complete(items, series_uid, ps)
    first = items[0][1]
    grid = Grid(size=(int(first.Columns), int(first.Rows), len(items)), spacing=(ps[1], ps[0], dz),
                origin=tuple(float(v) for v in pos[0]),  # type: ignore[arg-type]
                direction=tuple(float(v) for v in np.stack([row, col, normal], axis=1).ravel()))
    return SlicedSeries(datasets=[ds for _, ds in items], paths=[p for p, _ in items], grid=grid)


def _numbers(ds: pydicom.Dataset, keyword: str, path: Path) -> list[float] | None:
    v = ds.get(keyword)
    if v is None or v == "":
        return None
    try:
        vals = [float(x) for x in (v if isinstance(v, (list, tuple, pydicom.multival.MultiValue)) else [v])]
    except (TypeError, ValueError):
        raise SeriesError(f"{path}: {keyword} {v!r} is not a number") from None
    return vals


def _check_complete(items: list[tuple[Path, pydicom.Dataset]], series_uid: str, ps0: list[float]) -> None:
    """Every slice there and scaled alike: as many slices as NumberOfSlices (0054,0081) announces where
    the headers give it (PET), the same PixelSpacing on every slice, RescaleSlope and RescaleIntercept on
    every slice or on none, finite, the slope non-zero and at most 1e30 in magnitude. ``ps0``: the first
    slice's PixelSpacing, already checked."""
    p0 = items[0][0]
    have_slope = {p: ds.get("RescaleSlope") not in (None, "") for p, ds in items}  # an empty value is absent
    have_inter = {p: ds.get("RescaleIntercept") not in (None, "") for p, ds in items}
    for p, ds in items:
        ps = _numbers(ds, "PixelSpacing", p)
        if ps is None or len(ps) != 2 or not np.allclose(ps, ps0, rtol=1e-4, atol=1e-6):
            raise SeriesError(f"{p}: PixelSpacing {ps} differs from {ps0} of {p0.name} in series {series_uid} "
                              f"(one grid per series)")
        for key, have in (("RescaleSlope", have_slope), ("RescaleIntercept", have_inter)):
            n_have = sum(have.values())
            if 0 < n_have < len(items) and have[p] != (2 * n_have >= len(items)):  # name the odd ones out
                raise SeriesError(
                    f"{p}: {key} missing on this slice but present on the others of series {series_uid}; its "
                    f"values cannot be scaled" if not have[p] else
                    f"{p}: {key} present on this slice ({ds.get(key)!r}) but on only {n_have} of the "
                    f"{len(items)} slices of series {series_uid}; the series cannot be scaled consistently")
            vals = _numbers(ds, key, p) if have[p] else None
            if vals is not None and (len(vals) != 1 or not np.isfinite(vals[0])
                                     or (key == "RescaleSlope" and (vals[0] == 0 or abs(vals[0]) > 1e30))):
                raise SeriesError(f"{p}: {key} {ds.get(key)!r} is not a usable value (finite, slope non-zero and "
                                  f"at most 1e30) in series {series_uid}")
    n = len(items)
    announced = {int(v[0]) for v in (_numbers(ds, "NumberOfSlices", p) for p, ds in items) if v}
    if len(announced) > 1:
        raise SeriesError(f"series {series_uid}: NumberOfSlices differs between slices ({sorted(announced)})")
    if announced and announced != {n}:
        m = announced.pop()
        raise SeriesError(f"series {series_uid} ({p0.parent}): {n} slices found but NumberOfSlices (0054,0081) says "
                          f"{m}: " + ("slices are missing from the export (an edge slice lost?)" if n < m else
                                      "more slices than announced (files of another series mixed in?)"))


def rescaled_volume(series: SlicedSeries) -> Array:
    """Stored values × RescaleSlope + RescaleIntercept, slice by slice (z, y, x).

    Integer (int32) when every slope is 1 and every intercept a whole number (CT in HU), float64
    otherwise.
    """
    slopes = [float(getattr(ds, "RescaleSlope", 1.0) or 1.0) for ds in series.datasets]
    inters = [float(getattr(ds, "RescaleIntercept", 0.0) or 0.0) for ds in series.datasets]
    integral = all(s == 1.0 for s in slopes) and all(float(i).is_integer() for i in inters)
    out = np.empty(series.grid.shape_zyx, dtype=np.int32 if integral else np.float64)
    for k, ds in enumerate(series.datasets):
        if integral:
            out[k] = ds.pixel_array.astype(np.int32) + int(inters[k])
        else:
            with np.errstate(over="ignore", invalid="ignore"):
                out[k] = ds.pixel_array.astype(np.float64) * slopes[k] + inters[k]
            if not np.all(np.isfinite(out[k])):
                raise SeriesError(f"{series.paths[k]}: RescaleSlope {slopes[k]:g} / RescaleIntercept {inters[k]:g} "
                                  f"give values that are not finite")
    return out
