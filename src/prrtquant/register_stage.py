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
- ``masks.tsv`` lists every propagated mask (session, image role, roi, kind, path, and
  ``mask_session``: the session whose image the mask was drawn on);
- an MR session (ingest role ``mr``) is registered to the reference CT with Mattes MI
  (:func:`prrtquant.registration.register_mr_to_ct`): ``transforms/{mr}_to_reference.tfm`` and
  ``reference_to_{mr}.tfm``, QC in ``qc.json`` ``sessions[mr]`` with a fusion PNG; every mask drawn
  on the MR is carried onto every PET/SPECT grid through MR → reference → session in one resampling
  and onto the reference CT grid, named ``mr_{roi}`` (``mr_lesion_1``...) so that quantification,
  which reads ``lesion_N``, is unaffected; ``sessions[mr]["lesion_dice_vs_ct"]`` holds the Dice of
  each MR lesion with the same-named CT lesion on the reference CT;
- a PET/SPECT whose FrameOfReferenceUID differs from its session CT's is registered to that CT
  (:func:`prrtquant.registration.register_emission_to_ct`): ``transforms/{session}_emission_to_ct.tfm``
  and ``{session}_ct_to_emission.tfm``, QC in ``sessions[session]["emission"]``; a failure there fails
  the session (and flags the patient).

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
from .io import atomic_directory, read_image
from .registration import (
    RegistrationSettings,
    compose,
    dice,
    emission_overlay_png,
    emission_to_reference,
    fusion_overlay_png,
    mask_distance,
    propagate_mask,
    qc_overlay_png,
    register_ct,
    register_emission_to_ct,
    register_mr_to_ct,
    write_transform,
)

log = logging.getLogger(__name__)


class RegisterError(ValueError):
    pass


#: Columns of ``masks.tsv`` (``mask_session`` added with MR masks: the session the mask was drawn on).
MASKS_COLUMNS = ["session", "image_role", "image_path", "roi", "kind", "voxels", "path", "in_field_of_view",
                 "mask_session"]


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
        # RTSTRUCT contours as distance maps (distance_path) or rasterised finely (fine_path) at ingest keep
        # their sub-voxel shape: preferred; then SEG, RTSTRUCT on the CT grid, NIfTI
        rs_rows = on_ct[(on_ct.session == ref) & (on_ct.mask_source == "rtstruct")]
        fine = any(col in rs_rows and bool((rs_rows[col] != "").any()) for col in ("distance_path", "fine_path"))
        source = "rtstruct" if fine else ("seg" if "seg" in sources else (
            "rtstruct" if "rtstruct" in sources else "nifti"))
    else:
        source = mask_source
    if source not in sources:
        raise RegisterError(f"no {source} masks on the reference session {ref} (available: {sorted(sources)})")
    return ref, source


def _drawn_masks(ing: Path, rows: pd.DataFrame) -> tuple[dict[str, sitk.Image], dict[int, sitk.Image]]:
    """Masks of inventory ``rows`` (the finely rasterised copy when ingest wrote one) and, keyed by the id of
    each mask image, the contours' signed distance map when ingest wrote one (``distance_path``)."""
    masks: dict[str, sitk.Image] = {}
    distances: dict[int, sitk.Image] = {}
    for r in rows.itertuples():
        masks[r.roi] = read_image(str(ing / (getattr(r, "fine_path", "") or r.path)))
        if getattr(r, "distance_path", ""):
            distances[id(masks[r.roi])] = read_image(str(ing / r.distance_path), sitk.sitkFloat32)
    return masks, distances


def register_patient(ingest_dir: str | Path, out_dir: str | Path, settings: RegistrationSettings | None = None,
                     mask_source: str = "auto", reference_session: str | None = None,
                     fractional: bool = True, overlays: bool = True) -> dict[str, Any]:
    ing, out = Path(ingest_dir), Path(out_dir)
    settings = settings or RegistrationSettings()
    inv = _read_inventory(ing)
    ref, source = _reference(inv, mask_source, reference_session)
    ref_ct_row = inv[(inv.session == ref) & (inv.role == "ct")].iloc[0]
    ref_ct = read_image(str(ing / ref_ct_row.path))
    mrows = inv[(inv.session == ref) & (inv.role == "mask") & (inv.mask_source == source)]
    # the finely rasterised copy of a contour mask when ingest wrote one (same ROI, sub-voxel shape)
    masks, drawn_distances = _drawn_masks(ing, mrows)

    with atomic_directory(out) as tmp:
        (tmp / "transforms").mkdir()
        (tmp / "qc").mkdir()
        qc: dict[str, Any] = {}
        to_ref: dict[str, sitk.Transform | None] = {ref: None}
        ct_frame: dict[str, str] = {ref: ref_ct_row.frame_of_reference_uid}
        for row in inv[(inv.role == "ct") & (inv.session != ref)].itertuples():
            if row.session in to_ref:
                continue
            moving = read_image(str(ing / row.path))
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
        kinds = ("binary", "fractional") if fractional else ("binary",)

        # one distance map per drawn mask, reused for every grid: the contours' own when ingest wrote them
        distances: dict[int, sitk.Image | None] = dict(drawn_distances)  # drawn masks live as long as the
        # stage: their ids are unique

        def carry(session: str, role: str, image_path: str, target: sitk.Image, drawn: dict[str, sitk.Image],
                  t: sitk.Transform | None, prefix: str, mask_session: str) -> dict[str, sitk.Image]:
            """Propagate ``drawn`` onto ``target`` (one resampling each), write them, list them in ``rows``."""
            binary: dict[str, sitk.Image] = {}
            for roi0, m in drawn.items():
                roi = prefix + roi0
                if id(m) not in distances:
                    distances[id(m)] = mask_distance(m)
                for kind in kinds:
                    img = propagate_mask(m, t, target, fractional=(kind == "fractional"), distance=distances[id(m)])
                    rel = Path(session) / "masks" / kind / f"{roi}.nii.gz"
                    (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                    sitk.WriteImage(img, str(tmp / rel), useCompression=True)
                    arr = sitk.GetArrayViewFromImage(img)
                    rows.append({"session": session, "image_role": role, "image_path": image_path, "roi": roi,
                                 "kind": kind, "voxels": float(np.sum(arr)), "path": str(rel),
                                 "in_field_of_view": bool(np.any(arr)), "mask_session": mask_session})
                    if kind == "binary":
                        binary[roi] = img
            return binary

        # ---- MR sessions: MR -> reference CT (mutual information), masks drawn on the MR
        ref_to_mr: dict[str, sitk.Transform] = {}
        mr_masks: dict[str, dict[str, sitk.Image]] = {}
        for row in inv[inv.role == "mr"].itertuples():
            if row.session in ref_to_mr:
                continue
            mr = read_image(str(ing / row.path))
            res = register_mr_to_ct(ref_ct, mr, settings)
            assert res.inverse is not None
            write_transform(res.inverse, tmp / "transforms" / f"{row.session}_to_reference.tfm")
            write_transform(res.transform, tmp / "transforms" / f"reference_to_{row.session}.tfm")
            ref_to_mr[row.session] = res.transform
            qc[row.session] = {**res.qc_dict(), "kind": "mr_to_ct", "image_path": row.path}
            log.info("%s (MR) -> %s CT: MI %.3f, inverse consistency %.2f mm, body Dice %.3f, %s", row.session, ref,
                     res.metric, res.inverse_consistency_mm, res.body_dice, "passed" if res.passed else
                     "FAILED: " + "; ".join(res.reasons))
            if overlays:
                resampled = sitk.Resample(mr, ref_ct, res.transform, sitk.sitkLinear, 0.0)
                fusion_overlay_png(ref_ct, resampled, tmp / "qc" / f"{row.session}_mr_fusion.png",
                                   title=f"{row.session} MR on reference {ref} CT")
            mrows = inv[(inv.session == row.session) & (inv.role == "mask")]
            drawn, drawn_d = _drawn_masks(ing, mrows[~mrows.roi.astype(str).str.startswith("unmapped_")])
            distances.update(drawn_d)
            mr_masks[row.session] = drawn
            # MR masks on the reference CT grid (one resampling), and the cross-check with the CT's lesions
            on_ref = carry(ref, "ct", ref_ct_row.path, ref_ct, drawn, res.transform, "mr_", row.session)
            lesion_dice = {}
            for roi0 in drawn:
                if roi0.startswith("lesion_") and roi0 in masks:
                    # reference masks may live on a sub-grid of the CT (SEG): put them on the CT grid first
                    drawn_ct = sitk.Resample(masks[roi0], ref_ct, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                                             sitk.sitkUInt8)
                    lesion_dice[roi0] = dice(on_ref["mr_" + roi0], drawn_ct)
            qc[row.session]["lesion_dice_vs_ct"] = lesion_dice
            qc[row.session]["masks"] = sorted(drawn)

        # ---- masks onto every emission grid
        for row in inv[inv.role.isin(["pet", "spect"])].itertuples():
            if row.session not in to_ref:
                qc.setdefault(row.session, {"passed": False, "reasons": ["no CT in this session to register"]})
                continue
            target = read_image(str(ing / row.path))
            s2r = to_ref[row.session] or sitk.Transform(3, sitk.sitkIdentity)
            em_to_ct: sitk.Transform | None = None
            if row.frame_of_reference_uid != ct_frame[row.session]:
                ct_row = inv[(inv.session == row.session) & (inv.role == "ct")].iloc[0]
                session_ct = ref_ct if row.session == ref else read_image(str(ing / ct_row.path))
                eres = register_emission_to_ct(session_ct, target, settings)
                em_to_ct = eres.inverse
                assert em_to_ct is not None
                write_transform(em_to_ct, tmp / "transforms" / f"{row.session}_emission_to_ct.tfm")
                write_transform(eres.transform, tmp / "transforms" / f"{row.session}_ct_to_emission.tfm")
                sq = qc.setdefault(row.session, {"passed": True, "reasons": [], "reference": row.session == ref})
                sq["emission"] = {**eres.qc_dict(), "kind": "emission_to_ct", "image_path": row.path,
                                  "frame_of_reference_uid": row.frame_of_reference_uid,
                                  "ct_frame_of_reference_uid": ct_frame[row.session]}
                if not eres.passed:
                    sq["passed"] = False
                    sq["reasons"] = list(sq.get("reasons", [])) + [f"emission -> CT: {r}" for r in eres.reasons]
                log.info("%s %s -> CT (own frame of reference): MI %.3f, inverse consistency %.2f mm, body Dice "
                         "%.3f, %s", row.session, row.role, eres.metric, eres.inverse_consistency_mm, eres.body_dice,
                         "passed" if eres.passed else "FAILED: " + "; ".join(eres.reasons))
                if overlays:
                    resampled = sitk.Resample(target, session_ct, eres.transform, sitk.sitkLinear, 0.0)
                    fusion_overlay_png(session_ct, resampled, tmp / "qc" / f"{row.session}_{row.role}_fusion.png",
                                       title=f"{row.session} {row.role} on its CT (own frame of reference)")
            try:
                t = emission_to_reference(s2r, row.frame_of_reference_uid, ct_frame[row.session], em_to_ct)
            except ValueError as exc:
                raise RegisterError(f"{row.path}: {exc}") from exc
            prop = carry(row.session, row.role, row.path, target, masks, t, "", ref)
            for mr_session, drawn in mr_masks.items():
                # emission -> reference -> MR, one resampling
                prop.update(carry(row.session, row.role, row.path, target, drawn,
                                  compose(t, ref_to_mr[mr_session]), "mr_", mr_session))
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
        pd.DataFrame(rows, columns=MASKS_COLUMNS).to_csv(tmp / "masks.tsv", sep="\t", index=False)
    return summary


def settings_from_config(cfg: dict[str, Any] | None) -> tuple[RegistrationSettings, dict[str, Any]]:
    """Split the config's ``registration`` section into settings and stage options."""
    cfg = dict(cfg or {})
    stage = {k: cfg.pop(k) for k in ("mask_source", "reference_session", "fractional", "overlays") if k in cfg}
    for key in ("hu_window", "deformable_hu_window", "emission_hu_window"):
        if key in cfg:
            cfg[key] = tuple(cfg[key])
    known = set(RegistrationSettings.__dataclass_fields__)
    unknown = set(cfg) - known
    if unknown:
        raise ValueError(f"registration: unknown setting(s) {sorted(unknown)}")
    return RegistrationSettings(**cfg), stage
