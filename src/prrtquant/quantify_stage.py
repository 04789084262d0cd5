"""The PET part of the quantification stage (Bordeaux design): lesions.tsv, organs.tsv, eligibility.json.

Uses the ingest output (PET in Bq/mL + SUVbw factor, reference masks) and the registration output
(masks on each PET grid). Lobe T/N, cycles and cohort statistics are not wired yet (see
:mod:`prrtquant.quantify` for the tested computations).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd
import SimpleITK as sitk

from . import __version__
from .io import atomic_directory
from .quantify import (
    assign_lobe,
    eligibility,
    enhancement_ratios,
    healthy_liver_mask,
    region_stats,
    sstr_positive,
    suv_peak,
    tumour_to_liver,
)

ORGANS = ("kidney_left", "kidney_right", "spleen", "bone_marrow")


def _pet(ingest_dir: Path, inv: pd.DataFrame, session: str) -> tuple[sitk.Image, sitk.Image] | None:
    rows = inv[(inv.session == session) & (inv.role == "pet")]
    if rows.empty:
        return None
    path = ingest_dir / rows.iloc[0].path
    side = json.loads(path.with_name(path.name.replace(".nii.gz", ".json")).read_text())
    bq = sitk.ReadImage(str(path), sitk.sitkFloat64)
    return bq, bq * float(side["suv_bw_factor"])


def _masks(register_dir: Path, session: str, kind: str) -> dict[str, sitk.Image]:
    table = pd.read_csv(register_dir / "masks.tsv", sep="\t", dtype=str, keep_default_na=False)
    rows = table[(table.session == session) & (table.kind == kind)]
    return {r.roi: sitk.ReadImage(str(register_dir / r.path)) for r in rows.itertuples()}


def _pet_stats(bq: sitk.Image, suv: sitk.Image, masks: dict[str, sitk.Image], binary: dict[str, sitk.Image],
               roi: str) -> dict[str, float]:
    m = masks[roi]
    s = region_stats(suv, m)
    b = region_stats(bq, m)
    peak, _ = suv_peak(suv, binary[roi])
    return {"suvmean": s["mean"], "suvmax": s["max"], "suvpeak": peak, "bqml_mean": b["mean"]}


def quantify_pet(ingest_dir: str | Path, register_dir: str | Path, out_dir: str | Path, statistic: str = "er_max",
                 threshold: float = 3.0, mask_kind: str = "binary", liver_margin_mm: float = 0.0,
                 max_lesions: int = 5) -> dict[str, Any]:
    ing, reg = Path(ingest_dir), Path(register_dir)
    inv = pd.read_csv(ing / "inventory.tsv", sep="\t", dtype=str, keep_default_na=False)
    qc = json.loads((reg / "qc.json").read_text())
    ref, source = qc["reference_session"], qc["mask_source"]
    ref_masks = {r.roi: sitk.ReadImage(str(ing / r.path)) for r in inv[
        (inv.session == ref) & (inv.role == "mask") & (inv.mask_source == source)].itertuples()}
    lesions = sorted((r for r in ref_masks if r.startswith("lesion_")), key=lambda s: int(s.split("_")[1]))
    extra = sorted((r for r in ref_masks if r.startswith("extrahepatic_")), key=lambda s: int(s.split("_")[1]))
    notes: list[str] = []
    stats: dict[str, dict[str, dict[str, float]]] = {}
    for route, session in (("ia", "pet_ia"), ("iv", "pet_iv")):
        pet = _pet(ing, inv, session)
        if pet is None:
            notes.append(f"{session} missing: endpoints that need it are reported missing")
            continue
        bq, suv = pet
        binary = _masks(reg, session, "binary")
        masks = binary if mask_kind == "binary" else _masks(reg, session, "fractional")
        hl = healthy_liver_mask(binary["liver"], [binary[l] for l in lesions], liver_margin_mm)
        binary["healthy_liver"] = masks["healthy_liver"] = hl
        per: dict[str, dict[str, float]] = {}
        for roi in [*lesions, *extra, *ORGANS, "healthy_liver"]:
            if roi not in masks:
                continue
            try:
                per[roi] = _pet_stats(bq, suv, masks, binary, roi)
            except ValueError as exc:  # e.g. a lesion outside this PET's field of view
                notes.append(f"{session} {roi}: {exc}")
        stats[route] = per
    ia, iv = stats.get("ia", {}), stats.get("iv", {})
    er = enhancement_ratios({l: ia[l] for l in lesions if l in ia}, {l: iv[l] for l in lesions if l in iv}) \
        if ia and iv else pd.DataFrame(index=pd.Index(lesions, name="lesion"),
                                       columns=["er_mean", "er_max", "er_peak"], dtype=float)
    rows = []
    for les in lesions:
        lobe, frac = ("", math.nan)
        if "liver_left" in ref_masks and "liver_right" in ref_masks:
            try:
                lobe, frac = assign_lobe(ref_masks[les], ref_masks["liver_left"], ref_masks["liver_right"])
            except ValueError:
                lobe = ""
        vol = region_stats(ref_masks[les], ref_masks[les])["volume_ml"]
        row: dict[str, Any] = {"lesion": les, "lobe": lobe, "lobe_fraction": frac, "volume_ml": vol}
        for route, d in (("ia", ia), ("iv", iv)):
            for k in ("suvmean", "suvmax", "suvpeak", "bqml_mean"):
                row[f"{k}_{route}"] = d.get(les, {}).get(k, math.nan)
        for k in ("er_mean", "er_max", "er_peak"):
            row[k] = float(er.loc[les, k]) if les in er.index else math.nan
        if les in iv and "healthy_liver" in iv:
            tlr = tumour_to_liver(iv[les]["suvmean"], iv["healthy_liver"]["suvmean"])
            row["tlr_iv"], row["sstr_positive"] = tlr, sstr_positive(tlr)
        else:
            row["tlr_iv"], row["sstr_positive"] = math.nan, None
        rows.append(row)
    lesion_table = pd.DataFrame(rows)
    organ_rows = []
    for roi in [*ORGANS, "healthy_liver", *extra]:
        a, b = ia.get(roi, {}).get("suvmean", math.nan), iv.get(roi, {}).get("suvmean", math.nan)
        organ_rows.append({"region": roi, "suvmean_ia": a, "suvmean_iv": b, "ratio_ia_iv": a / b if b else math.nan})
    flags = [f"registration:{s}" for s in qc.get("failed_sessions", [])]
    if ia and iv and not er.empty:
        elig = eligibility(er, statistic=statistic, threshold=threshold, max_lesions=max_lesions, qc_flags=flags,
                           lesions=lesions)
    else:
        elig = {"statistic": statistic, "value": None, "threshold": threshold, "eligible": None,
                "n_lesions": 0, "qc_flags": flags, "flagged": bool(flags)}
    positive = [r["sstr_positive"] for r in rows if r["sstr_positive"] is not None]
    elig.update({"sstr_positive_fraction": (sum(positive) / len(positive)) if positive else None,
                 "mask_kind": mask_kind, "notes": notes, "prrtquant_version": __version__})
    with atomic_directory(out_dir) as tmp:
        lesion_table.to_csv(tmp / "lesions.tsv", sep="\t", index=False)
        pd.DataFrame(organ_rows).to_csv(tmp / "organs.tsv", sep="\t", index=False)
        (tmp / "eligibility.json").write_text(json.dumps(elig, indent=1, default=str))
    return elig
