"""The ingest stage's entry point: index, label, convert, write the inventory (atomically)."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from ...bounds import raise_if_any
from ...errors import IngestError
from ...io import atomic_directory
from ...plausibility import Flag
from ...roi_names import RoiMapper
from .. import layout
from .images import _Ctx, _ingest_ct_mr, _ingest_pet, _ingest_spect
from .inputs import IngestConfig, PatientSheet
from .masks import _ingest_nifti, _ingest_rtstruct, _ingest_seg
from .sessions import classify, label_sessions, scan

__all__ = ["ingest"]

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- entry point

def ingest(dicom_dir: str | Path, out_dir: str | Path, sheet: PatientSheet, config: IngestConfig | None = None) -> pd.DataFrame:
    """Ingest one patient's export; returns the inventory (also written to ``out_dir/inventory.tsv``)."""
    cfg = config or IngestConfig()
    root, out = Path(dicom_dir), Path(out_dir)
    if not root.is_dir():
        raise IngestError(f"{root}: not a directory")
    if out.exists() and not out.is_dir():
        raise IngestError(f"{out}: exists and is not a folder; refusing to replace it")
    if out.exists() and any(out.iterdir()) and not layout.INVENTORY.exists(out):
        raise IngestError(f"{out}: exists, is not empty and is not an ingest output; refusing to replace it")
    series, nifti, other = scan(root)
    if not series:
        raise IngestError(f"{root}: no DICOM files found")
    classify(series)
    session_flags: list[Flag] = []
    facts = label_sessions(series, sheet, cfg, session_flags)
    with atomic_directory(out) as tmp:
        ctx = _Ctx(out=tmp, rows=[], grids={}, mapper=RoiMapper(cfg.roi_map), flags=session_flags)
        for f in session_flags:
            log.warning("%s", f.message)
        order = sorted(series.values(), key=lambda r: (r.session, r.kind, r.uid))
        for rec in order:
            f = facts.get(rec.session, {})
            if rec.kind in ("ct", "mr"):
                _ingest_ct_mr(ctx, rec, f)
            elif rec.kind == "pet":
                _ingest_pet(ctx, rec, f, sheet, cfg)
            elif rec.kind in ("spect_nm", "spect_pt"):
                _ingest_spect(ctx, rec, f, sheet, cfg)
        for rec in order:
            if rec.kind == "rtstruct":
                _ingest_rtstruct(ctx, rec, series)
            elif rec.kind == "seg":
                _ingest_seg(ctx, rec, series)
            elif rec.kind == "ignored":
                ctx.add(series_instance_uid=rec.uid, modality=rec.modality, role="ignored",
                        study_instance_uid=rec.study_uid, note=rec.note)
        for p in nifti:
            _ingest_nifti(ctx, p, series)
        if cfg.fail_on_bounds:
            raise_if_any(ctx.bounds, f"{root}")
        inv = layout.INVENTORY.frame(ctx.rows)
        layout.INVENTORY.write(tmp, inv)
        layout.SESSIONS.write(tmp, {"patient": sheet.patient, "design": sheet.design, "treated_lobe": sheet.treated_lobe,
                             "sessions": facts, "ignored_files": len(other),
                             "physical_bounds": [v.as_dict() for v in ctx.bounds],
                             "plausibility": [f.as_dict() for f in ctx.flags]})
    log.info("%s: %d sessions, %d files written, %d non-DICOM files ignored", sheet.patient, len(facts),
             int((inv["path"] != "").sum()), len(other))
    return inv
