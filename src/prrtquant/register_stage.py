"""The registration stage on one patient's ingest output.

``register_patient(ingest_dir, out_dir, settings)``:

- the reference is the session whose CT carries the masks (or ``reference_session``);
- every other session's CT is registered to it (:func:`prrtquant.registration.register_ct`);
  transforms are saved as ``transforms/{session}_to_reference.tfm`` (session points → reference
  points) and ``transforms/reference_to_{session}.tfm``;
- every mask drawn on the reference CT is carried onto every PET and SPECT grid in one resampling
  (binary and, when asked, fractional): ``{session}/masks/{roi}.nii.gz``;
- QC per registration (Mattes MI, inverse consistency, body Dice) in ``qc.json`` with PNG overlays in
  ``qc/``; a failed check sets ``flagged`` for the patient, it never passes silently;
- ``masks.tsv`` lists every propagated mask (session, image role, roi, kind, path).

Written atomically like ingest: a failure leaves no partial output.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import SimpleITK as sitk

from . import __version__
from .io import atomic_directory
from .registration import (
    RegistrationSettings,
    emission_overlay_png,
    emission_to_reference,
    propagate_mask,
    qc_overlay_png,
    register_ct,
    write_transform,
)

log = logging.getLogger(__name__)


class RegisterError(ValueError):
    pass


def _read_inventory(ingest_dir: Path) -> pd.DataFrame:
    p = ingest_dir / "inventory.tsv"
    if not p.exists():
        raise RegisterError(f"{p}: no ingest inventory (run `prrtquant ingest` first)")
    return pd.read_csv(p, sep="\t", dtype=str, keep_default_na=False)


def _reference(inv: pd.DataFrame, mask_source: str, reference_session: str | None) -> tuple[str, str]:
    masks = inv[(inv.role == "mask") & (inv.modality.isin(["RTSTRUCT", "SEG", "NIFTI"]))]
    cts = set(inv[inv.role == "ct"].session)
    on_ct = masks[masks.session.isin(cts)]
    if reference_session:
        if reference_session not in cts:
            raise RegisterError(f"reference_session {reference_session!r} has no CT (sessions with CT: {sorted(cts)})")
        ref = reference_session
    else:
        if on_ct.empty:
            raise RegisterError("no masks drawn on a CT in the ingest output: nothing to propagate")
        ref = sorted(set(on_ct.session))[0]
    sources = set(on_ct[on_ct.session == ref].mask_source)
    if mask_source == "auto":
        source = "seg" if "seg" in sources else ("rtstruct" if "rtstruct" in sources else "nifti")
    else:
        source = mask_source
    if source not in sources:
        raise RegisterError(f"no {source} masks on the reference session {ref} (available: {sorted(sources)})")
    return ref, source


def register_patient(ingest_dir: str | Path, out_dir: str | Path, settings: RegistrationSettings | None = None,
                     mask_source: str = "auto", reference_session: str | None = None,
                     fractional: bool = True, overlays: bool = True) -> dict[str, Any]:
    ing, out = Path(ingest_dir), Path(out_dir)
    settings = settings or RegistrationSettings()
    inv = _read_inventory(ing)
    ref, source = _reference(inv, mask_source, reference_session)
    ref_ct_row = inv[(inv.session == ref) & (inv.role == "ct")].iloc[0]
    ref_ct = sitk.ReadImage(str(ing / ref_ct_row.path))
    mrows = inv[(inv.session == ref) & (inv.role == "mask") & (inv.mask_source == source)]
    masks = {r.roi: sitk.ReadImage(str(ing / r.path)) for r in mrows.itertuples()}

    with atomic_directory(out) as tmp:
        (tmp / "transforms").mkdir()
        (tmp / "qc").mkdir()
        qc: dict[str, Any] = {}
        to_ref: dict[str, sitk.Transform | None] = {ref: None}
        ct_frame: dict[str, str] = {ref: ref_ct_row.frame_of_reference_uid}
        for row in inv[(inv.role == "ct") & (inv.session != ref)].itertuples():
            if row.session in to_ref:
                continue
            moving = sitk.ReadImage(str(ing / row.path))
            res = register_ct(ref_ct, moving, settings)
            assert res.inverse is not None
            write_transform(res.inverse, tmp / "transforms" / f"{row.session}_to_reference.tfm")
            write_transform(res.transform, tmp / "transforms" / f"reference_to_{row.session}.tfm")
            to_ref[row.session] = res.inverse
            ct_frame[row.session] = row.frame_of_reference_uid
            qc[row.session] = res.qc_dict()
            log.info("%s -> %s: MI %.3f, inverse consistency %.2f mm, body Dice %.3f, %s", row.session, ref,
                     res.metric, res.inverse_consistency_mm, res.body_dice, "passed" if res.passed else
                     "FAILED: " + "; ".join(res.reasons))
            if overlays:
                resampled = sitk.Resample(moving, ref_ct, res.transform, sitk.sitkLinear, -1000.0)
                qc_overlay_png(ref_ct, resampled, tmp / "qc" / f"{row.session}_ct_checkerboard.png",
                               title=f"{row.session} CT on reference {ref}")
        rows: list[dict[str, Any]] = []
        for row in inv[inv.role.isin(["pet", "spect"])].itertuples():
            if row.session not in to_ref:
                qc.setdefault(row.session, {"passed": False, "reasons": ["no CT in this session to register"]})
                continue
            target = sitk.ReadImage(str(ing / row.path))
            s2r = to_ref[row.session] or sitk.Transform(3, sitk.sitkIdentity)
            try:
                t = emission_to_reference(s2r, row.frame_of_reference_uid, ct_frame[row.session])
            except ValueError as exc:
                raise RegisterError(f"{row.path}: {exc}") from exc
            prop: dict[str, sitk.Image] = {}
            for roi, m in masks.items():
                for kind in (("binary", "fractional") if fractional else ("binary",)):
                    img = propagate_mask(m, t, target, fractional=(kind == "fractional"))
                    rel = Path(row.session) / "masks" / kind / f"{roi}.nii.gz"
                    (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                    sitk.WriteImage(img, str(tmp / rel), useCompression=True)
                    arr = sitk.GetArrayViewFromImage(img)
                    rows.append({"session": row.session, "image_role": row.role, "image_path": row.path, "roi": roi,
                                 "kind": kind, "voxels": float(np.sum(arr)), "path": str(rel),
                                 "in_field_of_view": bool(np.any(arr))})
                    if kind == "binary":
                        prop[roi] = img
            if overlays:
                lesions = sorted(r for r in prop if r.startswith("lesion_"))
                for les in lesions:
                    a = sitk.GetArrayViewFromImage(prop[les])
                    if not np.any(a):
                        continue
                    k, j, i = np.argwhere(a).mean(axis=0)
                    centre = prop[les].TransformContinuousIndexToPhysicalPoint((float(i), float(j), float(k)))
                    emission_overlay_png(target, {r: prop[r] for r in ("liver", les) if r in prop}, centre,
                                         tmp / "qc" / f"{row.session}_{les}.png", title=f"{row.session} {les}")
        failed = sorted(s for s, q in qc.items() if not q.get("passed", False))
        summary = {"reference_session": ref, "mask_source": source, "flagged": bool(failed),
                   "failed_sessions": failed, "sessions": qc, "settings": asdict(settings),
                   "prrtquant_version": __version__}
        (tmp / "qc.json").write_text(json.dumps(summary, indent=1, default=str))
        pd.DataFrame(rows).to_csv(tmp / "masks.tsv", sep="\t", index=False)
    return summary


def settings_from_config(cfg: dict[str, Any] | None) -> tuple[RegistrationSettings, dict[str, Any]]:
    """Split the config's ``registration`` section into settings and stage options."""
    cfg = dict(cfg or {})
    stage = {k: cfg.pop(k) for k in ("mask_source", "reference_session", "fractional", "overlays") if k in cfg}
    if "hu_window" in cfg:
        cfg["hu_window"] = tuple(cfg["hu_window"])
    known = set(RegistrationSettings.__dataclass_fields__)
    unknown = set(cfg) - known
    if unknown:
        raise ValueError(f"registration: unknown setting(s) {sorted(unknown)}")
    return RegistrationSettings(**cfg), stage
