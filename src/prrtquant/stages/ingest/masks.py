"""Masks of an export: RTSTRUCT (exact and fine rasterisation, contour distance maps), DICOM SEG, NIfTI label maps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pydicom
import SimpleITK as sitk

from ... import __version__
from ...dicom.rtstruct import MaskError, contour_distance_maps, rasterize_rtstruct, rtstruct_rois
from ...errors import IngestError
from ...geometry import Grid
from .images import _base_row, _Ctx, _image, _safe, _write_image
from .sessions import SeriesRecord

__all__ = ["FINE_MASK_MM", "CONTOUR_SLICE_MM"]

#: RTSTRUCT contours are also rasterised on an in-plane grid this fine (mm), so that registration can carry
#: their sub-voxel shape onto emission grids (written as masks/rtstruct_fine/, cropped to the ROI).
FINE_MASK_MM = 1.0
#: contour distance maps get slices interpolated (monotone cubic) to at most this spacing
CONTOUR_SLICE_MM = 2.0

def _referenced_series_rtstruct(ds: pydicom.Dataset) -> str | None:
    for fr in getattr(ds, "ReferencedFrameOfReferenceSequence", []):
        for st in getattr(fr, "RTReferencedStudySequence", []):
            for se in getattr(st, "RTReferencedSeriesSequence", []):
                return str(se.SeriesInstanceUID)
    return None


def _referenced_series_seg(ds: pydicom.Dataset) -> str | None:
    for se in getattr(ds, "ReferencedSeriesSequence", []):
        return str(se.SeriesInstanceUID)
    return None


def _write_masks(ctx: _Ctx, rec: SeriesRecord, ref: SeriesRecord, masks: list[tuple[str, np.ndarray]],
                 source: str) -> dict[str, dict[str, Any]]:
    """Write masks on their image's grid and add inventory rows; returns source ROI name → its row."""
    grid = ctx.grids[ref.uid]
    written: dict[str, dict[str, Any]] = {}
    used: set[str] = set()
    for name, mask in masks:
        canonical = ctx.mapper.canonical(name)
        stem = canonical if canonical else f"unmapped_{_safe(name)}"
        while stem in used:
            stem += "_dup"
        used.add(stem)
        rel = Path(ref.session) / "masks" / source / f"{stem}.nii.gz"
        fractional = mask.dtype != bool
        img = _image(mask, grid, np.float32 if fractional else np.uint8)
        side = {"roi": canonical, "source_roi_name": name, "mask_source": source,
                "kind": "fractional" if fractional else "binary", "voxels": int(np.count_nonzero(mask)),
                "volume_ml": float(np.sum(mask) * grid.voxel_volume_ml),
                "source_series_instance_uid": rec.uid, "image_series_instance_uid": ref.uid,
                "prrtquant_version": __version__}
        if not np.any(mask):
            raise IngestError(f"{rec.paths[0]} (series {rec.uid}): ROI '{name}' is empty on its image (outside it?)")
        _write_image(img, ctx.out / rel, side)
        row = _base_row(ref, {})
        row.update(series_instance_uid=rec.uid, modality=rec.modality)
        ctx.add(**row, role="mask" if canonical else "unmapped_mask", roi=canonical or "", source_roi_name=name,
                mask_source=source, units="fraction" if fractional else "binary", path=str(rel),
                note="" if canonical else "ROI name not mapped to a canonical name; see roi_map in the config")
        written[name] = ctx.rows[-1]
    return written


def _write_fine_masks(ctx: _Ctx, ds: pydicom.Dataset, rec: SeriesRecord, ref: SeriesRecord,
                      rows: dict[str, dict[str, Any]]) -> None:
    """RTSTRUCT contours as signed distance maps, and rasterised on an in-plane-refined grid.

    Contours carry their shape at sub-voxel precision; a mask on a coarse CT grid (e.g. 5 mm voxels) loses
    it, and with it up to several % of a small lesion's mean uptake on another grid. Both are written on
    the image's slices with pixels refined to <= FINE_MASK_MM: the signed distance to the contours
    (``masks/rtstruct_distance``, inventory ``distance_path``: the surface registration carries, without a
    voxel staircase; see :func:`prrtquant.dicom.rtstruct.contour_distance_maps`) and, for coarse images, the
    voxel-centre mask on that grid (``masks/rtstruct_fine``, ``fine_path``), cropped to each ROI.
    """
    grid = ctx.grids[ref.uid]
    factor = int(np.ceil(max(grid.spacing[0], grid.spacing[1]) / FINE_MASK_MM - 1e-6))
    fine = grid.refined((factor, factor, 1)) if factor > 1 else grid
    try:
        distances = contour_distance_maps(ds, fine, source=f"{rec.paths[0]}", max_slice_mm=CONTOUR_SLICE_MM,
                                          volume_preserving=True)
    except MaskError as exc:
        raise IngestError(str(exc)) from exc
    masks = rasterize_rtstruct(ds, fine, source=f"{rec.paths[0]}") if factor > 1 else {}
    for name, row in rows.items():
        side = {"roi": row["roi"], "source_roi_name": name, "mask_source": "rtstruct",
                "in_plane_refinement": factor, "source_series_instance_uid": rec.uid,
                "image_series_instance_uid": ref.uid, "prrtquant_version": __version__}
        if name in distances:
            phi, sub = distances[name]
            rel = Path(row["path"].replace("/masks/rtstruct/", "/masks/rtstruct_distance/"))
            _write_image(_image(phi, sub, np.float32), ctx.out / rel,
                         {**side, "kind": "signed_distance", "units": "mm",
                          "convention": "negative inside; in-plane distance to the contours on each contoured "
                                        "slice, linear between slices, closing half a slice beyond the end "
                                        "contours"})
            row["distance_path"] = str(rel)
        mask = masks.get(name)
        if mask is None or not mask.any():
            continue
        idx = np.argwhere(mask)
        margin = np.array([1, 2 * factor, 2 * factor])
        lo = np.maximum(idx.min(axis=0) - margin, 0)
        hi = np.minimum(idx.max(axis=0) + margin + 1, mask.shape)
        crop = mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        origin = fine.index_to_physical(lo[::-1][None, :].astype(float))[0]
        sub = Grid(size=tuple(int(v) for v in crop.shape[::-1]), spacing=fine.spacing,  # type: ignore[arg-type]
                   origin=tuple(float(v) for v in origin), direction=fine.direction)  # type: ignore[arg-type]
        rel = Path(row["path"].replace("/masks/rtstruct/", "/masks/rtstruct_fine/"))
        _write_image(_image(crop, sub, np.uint8), ctx.out / rel,
                     {**side, "kind": "binary", "voxels": int(crop.sum()),
                      "volume_ml": float(crop.sum() * sub.voxel_volume_ml)})
        row["fine_path"] = str(rel)


def _ingest_rtstruct(ctx: _Ctx, rec: SeriesRecord, series: dict[str, SeriesRecord]) -> None:
    try:
        ds = pydicom.dcmread(rec.paths[0])
    except Exception as exc:  # noqa: BLE001
        raise IngestError(f"{rec.paths[0]} (RTSTRUCT series {rec.uid}): unreadable or truncated ({exc})") from exc
    ref_uid = _referenced_series_rtstruct(ds)
    ref = series.get(ref_uid or "")
    if ref is None or ref.uid not in ctx.grids:
        raise IngestError(f"{rec.paths[0]} (RTSTRUCT series {rec.uid}): the image it was drawn on (series "
                          f"{ref_uid}) is not in the export")
    try:
        masks = rasterize_rtstruct(ds, ctx.grids[ref.uid], source=f"{rec.paths[0]}")
    except MaskError as exc:
        raise IngestError(str(exc)) from exc
    names = [r.name for r in rtstruct_rois(ds)]
    rows = _write_masks(ctx, rec, ref, [(n, masks[n]) for n in names if n in masks], "rtstruct")
    _write_fine_masks(ctx, ds, rec, ref, rows)
    for n in names:
        if n not in masks:
            ctx.add(**_base_row(ref, {}), role="empty_roi", source_roi_name=n, mask_source="rtstruct",
                    note="ROI without contours")


def _ingest_seg(ctx: _Ctx, rec: SeriesRecord, series: dict[str, SeriesRecord]) -> None:
    from ...dicom.seg import SegError, read_seg

    ref_uid = _referenced_series_seg(rec.header)
    ref = series.get(ref_uid or "")
    if ref is None or ref.uid not in ctx.grids:
        raise IngestError(f"{rec.paths[0]} (SEG series {rec.uid}): the image it was drawn on (series {ref_uid}) is "
                          f"not in the export")
    try:
        segs = read_seg(rec.paths[0], ctx.grids[ref.uid])
    except SegError as exc:
        raise IngestError(str(exc)) from exc
    _write_masks(ctx, rec, ref, [(s.label, s.mask) for s in segs], "seg")


def _ingest_nifti(ctx: _Ctx, path: Path, series: dict[str, SeriesRecord]) -> None:
    """A NIfTI mask or label map (with ``<stem>.tsv``: columns value, name) on one ingested image's grid."""
    img = sitk.ReadImage(str(path))
    g = Grid.of(img)
    match = None
    for uid, grid in ctx.grids.items():
        if grid.size == g.size and np.allclose(grid.spacing, g.spacing, atol=1e-3) and \
                np.allclose(grid.origin, g.origin, atol=1e-2) and np.allclose(grid.direction, g.direction, atol=1e-4):
            match = series[uid]
            break
    if match is None:
        raise IngestError(f"{path}: NIfTI mask whose grid matches no image of the export (mask outside its image?)")
    arr = sitk.GetArrayFromImage(img)
    stem = path.name[:-7] if path.name.endswith(".nii.gz") else path.stem
    table = path.with_name(stem + ".tsv")
    masks: list[tuple[str, np.ndarray]] = []
    if table.exists():
        lut = pd.read_csv(table, sep="\t", dtype={"value": int, "name": str})
        for v, name in zip(lut["value"], lut["name"]):
            masks.append((str(name), arr == int(v)))
    else:
        masks.append((stem, arr > 0))
    fake = SeriesRecord(uid="", modality="NIFTI", sop_class="", study_uid=match.study_uid, frame_uid=match.frame_uid,
                        header=pydicom.Dataset(), paths=[path])
    _write_masks(ctx, fake, match, masks, "nifti")


