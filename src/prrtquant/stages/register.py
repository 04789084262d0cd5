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

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import SimpleITK as sitk

from .. import __version__
from ..errors import RegisterError
from ..io import atomic_directory, read_image
from ..registration import (
    RegistrationResult,
    RegistrationSettings,
    compose,
    dice,
    emission_overlay_png,
    emission_to_reference,
    fusion_overlay_png,
    propagate_mask,
    qc_overlay_png,
    register_ct,
    register_emission_to_ct,
    register_mr_to_ct,
    write_transform,
)
from ..registration.propagate import mask_distance
from . import layout

log = logging.getLogger(__name__)


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


@dataclass
class _Run:
    """One registration run: its inputs, the temporary output folder, and what it accumulates (per-session QC,
    the ``masks.tsv`` rows, one distance map per drawn mask keyed by the mask image's id)."""

    ing: Path
    tmp: Path
    inv: pd.DataFrame
    settings: RegistrationSettings
    ref: str
    ref_ct_row: Any
    ref_ct: sitk.Image
    overlays: bool
    kinds: tuple[str, ...]
    qc: dict[str, Any] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    # drawn masks live as long as the stage: their ids are unique
    distances: dict[int, sitk.Image | None] = field(default_factory=dict)


def _verdict(res: RegistrationResult) -> str:
    """The end of a registration's log line: passed, or FAILED with the reasons."""
    return "passed" if res.passed else "FAILED: " + "; ".join(res.reasons)


def _write_transforms(run: _Run, res: RegistrationResult, inverse_name: str, forward_name: str) -> None:
    """Write a registration's inverse and forward transforms into ``transforms/``."""
    assert res.inverse is not None
    write_transform(res.inverse, run.tmp / "transforms" / inverse_name)
    write_transform(res.transform, run.tmp / "transforms" / forward_name)


def _carry(run: _Run, session: str, role: str, image_path: str, target: sitk.Image, drawn: dict[str, sitk.Image],
           t: sitk.Transform | None, prefix: str, mask_session: str) -> dict[str, sitk.Image]:
    """Propagate ``drawn`` onto ``target`` (one resampling each), write them, list them in ``run.rows``; return
    the binary masks by (prefixed) roi."""
    binary: dict[str, sitk.Image] = {}
    for roi0, m in drawn.items():
        roi = prefix + roi0
        if id(m) not in run.distances:
            run.distances[id(m)] = mask_distance(m)
        for kind in run.kinds:
            img = propagate_mask(m, t, target, fractional=(kind == "fractional"), distance=run.distances[id(m)])
            rel = Path(session) / "masks" / kind / f"{roi}.nii.gz"
            (run.tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            sitk.WriteImage(img, str(run.tmp / rel), useCompression=True)
            arr = sitk.GetArrayViewFromImage(img)
            run.rows.append({"session": session, "image_role": role, "image_path": image_path, "roi": roi,
                             "kind": kind, "voxels": float(np.sum(arr)), "path": str(rel),
                             "in_field_of_view": bool(np.any(arr)), "mask_session": mask_session})
            if kind == "binary":
                binary[roi] = img
    return binary


def _register_session_cts(run: _Run) -> tuple[dict[str, sitk.Transform | None], dict[str, str]]:
    """Register every other session's CT to the reference CT (transforms, QC, checkerboard); return (session →
    reference transform, None for the reference; session → its CT's frame of reference)."""
    ref = run.ref
    to_ref: dict[str, sitk.Transform | None] = {ref: None}
    ct_frame: dict[str, str] = {ref: run.ref_ct_row.frame_of_reference_uid}
    for row in run.inv[(run.inv.role == "ct") & (run.inv.session != ref)].itertuples():
        if row.session in to_ref:
            continue
        moving = read_image(str(run.ing / row.path))
        res = register_ct(run.ref_ct, moving, run.settings)
        _write_transforms(run, res, f"{row.session}_to_reference.tfm", f"reference_to_{row.session}.tfm")
        to_ref[row.session] = res.inverse
        ct_frame[row.session] = row.frame_of_reference_uid
        run.qc[row.session] = res.qc_dict()
        log.info("%s -> %s: MI %.3f, inverse consistency %.2f mm, body Dice %.3f, %s", row.session, ref,
                 res.metric, res.inverse_consistency_mm, res.body_dice, _verdict(res))
        if run.overlays:
            resampled = sitk.Resample(moving, run.ref_ct, res.transform, sitk.sitkLinear, -1000.0)
            qc_overlay_png(run.ref_ct, resampled, run.tmp / "qc" / f"{row.session}_ct_checkerboard.png",
                           title=f"{row.session} CT on reference {ref}")
    return to_ref, ct_frame


def _register_mr(run: _Run, row: Any) -> sitk.Transform:
    """Register one MR to the reference CT (Mattes MI): transforms, QC, fusion PNG; return reference → MR."""
    mr = read_image(str(run.ing / row.path))
    res = register_mr_to_ct(run.ref_ct, mr, run.settings)
    _write_transforms(run, res, f"{row.session}_to_reference.tfm", f"reference_to_{row.session}.tfm")
    run.qc[row.session] = {**res.qc_dict(), "kind": "mr_to_ct", "image_path": row.path}
    log.info("%s (MR) -> %s CT: MI %.3f, inverse consistency %.2f mm, body Dice %.3f, %s", row.session, run.ref,
             res.metric, res.inverse_consistency_mm, res.body_dice, _verdict(res))
    if run.overlays:
        resampled = sitk.Resample(mr, run.ref_ct, res.transform, sitk.sitkLinear, 0.0)
        fusion_overlay_png(run.ref_ct, resampled, run.tmp / "qc" / f"{row.session}_mr_fusion.png",
                           title=f"{row.session} MR on reference {run.ref} CT")
    return res.transform


def _mr_masks_on_reference(run: _Run, row: Any, ref_to_mr: sitk.Transform,
                           masks: dict[str, sitk.Image]) -> dict[str, sitk.Image]:
    """The masks drawn on one MR, carried onto the reference CT grid (one resampling) and cross-checked with
    the CT's same-named lesions (Dice in QC); return the drawn masks."""
    mrows = run.inv[(run.inv.session == row.session) & (run.inv.role == "mask")]
    drawn, drawn_d = _drawn_masks(run.ing, mrows[~mrows.roi.astype(str).str.startswith("unmapped_")])
    run.distances.update(drawn_d)
    on_ref = _carry(run, run.ref, "ct", run.ref_ct_row.path, run.ref_ct, drawn, ref_to_mr, "mr_", row.session)
    lesion_dice = {}
    for roi0 in drawn:
        if roi0.startswith("lesion_") and roi0 in masks:
            # reference masks may live on a sub-grid of the CT (SEG): put them on the CT grid first
            drawn_ct = sitk.Resample(masks[roi0], run.ref_ct, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                                     sitk.sitkUInt8)
            lesion_dice[roi0] = dice(on_ref["mr_" + roi0], drawn_ct)
    run.qc[row.session]["lesion_dice_vs_ct"] = lesion_dice
    run.qc[row.session]["masks"] = sorted(drawn)
    return drawn


def _register_mrs(run: _Run, masks: dict[str, sitk.Image]
                  ) -> tuple[dict[str, sitk.Transform], dict[str, dict[str, sitk.Image]]]:
    """Every MR session to the reference CT, its masks onto the reference CT; return (MR session → reference
    → MR transform, MR session → masks drawn on it)."""
    ref_to_mr: dict[str, sitk.Transform] = {}
    mr_masks: dict[str, dict[str, sitk.Image]] = {}
    for row in run.inv[run.inv.role == "mr"].itertuples():
        if row.session in ref_to_mr:
            continue
        ref_to_mr[row.session] = _register_mr(run, row)
        mr_masks[row.session] = _mr_masks_on_reference(run, row, ref_to_mr[row.session], masks)
    return ref_to_mr, mr_masks


def _register_emission_to_ct(run: _Run, row: Any, target: sitk.Image, ct_frame: dict[str, str]) -> sitk.Transform:
    """Register a PET/SPECT with its own frame of reference to its session's CT: transforms, QC in
    ``sessions[session]["emission"]`` (a failure fails the session), fusion PNG; return emission → CT."""
    ct_row = run.inv[(run.inv.session == row.session) & (run.inv.role == "ct")].iloc[0]
    session_ct = run.ref_ct if row.session == run.ref else read_image(str(run.ing / ct_row.path))
    eres = register_emission_to_ct(session_ct, target, run.settings)
    em_to_ct = eres.inverse
    _write_transforms(run, eres, f"{row.session}_emission_to_ct.tfm", f"{row.session}_ct_to_emission.tfm")
    sq = run.qc.setdefault(row.session, {"passed": True, "reasons": [], "reference": row.session == run.ref})
    sq["emission"] = {**eres.qc_dict(), "kind": "emission_to_ct", "image_path": row.path,
                      "frame_of_reference_uid": row.frame_of_reference_uid,
                      "ct_frame_of_reference_uid": ct_frame[row.session]}
    if not eres.passed:
        sq["passed"] = False
        sq["reasons"] = list(sq.get("reasons", [])) + [f"emission -> CT: {r}" for r in eres.reasons]
    log.info("%s %s -> CT (own frame of reference): MI %.3f, inverse consistency %.2f mm, body Dice "
             "%.3f, %s", row.session, row.role, eres.metric, eres.inverse_consistency_mm, eres.body_dice,
             _verdict(eres))
    if run.overlays:
        resampled = sitk.Resample(target, session_ct, eres.transform, sitk.sitkLinear, 0.0)
        fusion_overlay_png(session_ct, resampled, run.tmp / "qc" / f"{row.session}_{row.role}_fusion.png",
                           title=f"{row.session} {row.role} on its CT (own frame of reference)")
    return em_to_ct


def _lesion_overlays(run: _Run, row: Any, target: sitk.Image, prop: dict[str, sitk.Image]) -> None:
    """One PNG per propagated lesion in the field of view, centred on it, with the liver."""
    lesions = sorted(r for r in prop if r.startswith("lesion_"))
    for les in lesions:
        a = sitk.GetArrayViewFromImage(prop[les])
        if not np.any(a):
            continue
        k, j, i = np.argwhere(a).mean(axis=0)
        centre = prop[les].TransformContinuousIndexToPhysicalPoint((float(i), float(j), float(k)))
        emission_overlay_png(target, {r: prop[r] for r in ("liver", les) if r in prop}, centre,
                             run.tmp / "qc" / f"{row.session}_{les}.png", title=f"{row.session} {les}")


def _emission_masks(run: _Run, masks: dict[str, sitk.Image], to_ref: dict[str, sitk.Transform | None],
                    ct_frame: dict[str, str], ref_to_mr: dict[str, sitk.Transform],
                    mr_masks: dict[str, dict[str, sitk.Image]]) -> None:
    """Every reference and MR mask onto every PET/SPECT grid (emission → CT first when its frame of reference
    differs), with lesion overlays; a session without a CT fails in QC."""
    for row in run.inv[run.inv.role.isin(["pet", "spect"])].itertuples():
        if row.session not in to_ref:
            run.qc.setdefault(row.session, {"passed": False, "reasons": ["no CT in this session to register"]})
            continue
        target = read_image(str(run.ing / row.path))
        s2r = to_ref[row.session] or sitk.Transform(3, sitk.sitkIdentity)
        em_to_ct: sitk.Transform | None = None
        if row.frame_of_reference_uid != ct_frame[row.session]:
            em_to_ct = _register_emission_to_ct(run, row, target, ct_frame)
        try:
            t = emission_to_reference(s2r, row.frame_of_reference_uid, ct_frame[row.session], em_to_ct)
        except ValueError as exc:
            raise RegisterError(f"{row.path}: {exc}") from exc
        prop = _carry(run, row.session, row.role, row.path, target, masks, t, "", run.ref)
        for mr_session, drawn in mr_masks.items():
            # emission -> reference -> MR, one resampling
            prop.update(_carry(run, row.session, row.role, row.path, target, drawn,
                               compose(t, ref_to_mr[mr_session]), "mr_", mr_session))
        if run.overlays:
            _lesion_overlays(run, row, target, prop)


def register_patient(ingest_dir: str | Path, out_dir: str | Path, settings: RegistrationSettings | None = None,
                     mask_source: str = "auto", reference_session: str | None = None,
                     fractional: bool = True, overlays: bool = True) -> dict[str, Any]:
    """Register every session of one patient to the reference CT and carry the masks onto every PET/SPECT grid
    (see the module docstring); write ``qc.json``, ``masks.tsv``, the masks, transforms and QC PNGs atomically
    into ``out_dir`` and return the content of ``qc.json``.

    ``mask_source``: auto | seg | rtstruct | nifti; ``reference_session``: default the session whose CT carries
    the masks; ``fractional``: also partial-volume masks; ``overlays``: QC PNGs.
    """
    ing, out = Path(ingest_dir), Path(out_dir)
    settings = settings or RegistrationSettings()
    inv = layout.INVENTORY.read(ing)
    ref, source = _reference(inv, mask_source, reference_session)
    ref_ct_row = inv[(inv.session == ref) & (inv.role == "ct")].iloc[0]
    ref_ct = read_image(str(ing / ref_ct_row.path))
    mrows = inv[(inv.session == ref) & (inv.role == "mask") & (inv.mask_source == source)]
    # the finely rasterised copy of a contour mask when ingest wrote one (same ROI, sub-voxel shape)
    masks, drawn_distances = _drawn_masks(ing, mrows)

    with atomic_directory(out) as tmp:
        (tmp / "transforms").mkdir()
        (tmp / "qc").mkdir()
        run = _Run(ing=ing, tmp=tmp, inv=inv, settings=settings, ref=ref, ref_ct_row=ref_ct_row, ref_ct=ref_ct,
                   overlays=overlays, kinds=("binary", "fractional") if fractional else ("binary",),
                   # one distance map per drawn mask, reused for every grid: the contours' own when ingest
                   # wrote them
                   distances=dict(drawn_distances))
        to_ref, ct_frame = _register_session_cts(run)
        ref_to_mr, mr_masks = _register_mrs(run, masks)
        _emission_masks(run, masks, to_ref, ct_frame, ref_to_mr, mr_masks)
        failed = sorted(s for s, q in run.qc.items() if not q.get("passed", False))
        summary = {"reference_session": ref, "mask_source": source, "flagged": bool(failed),
                   "failed_sessions": failed, "sessions": run.qc, "settings": asdict(settings),
                   "prrtquant_version": __version__}
        layout.REGISTRATION_QC.write(tmp, summary)
        layout.MASKS.write(tmp, run.rows)
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
