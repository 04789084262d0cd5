"""The dosimetry stage: ingest + register outputs → tac.tsv, fits.tsv, dosimetry.tsv, dvh.tsv, dose maps.

Inputs: the ingest inventory (SPECT rows, role ``spect``, Bq/mL at acquisition, sidecar JSON with cycle,
hours after injection and injected activity; the session's CT for density) and the registration
output (``masks.tsv``: every reference mask carried onto each SPECT grid). Computations are those of
:mod:`prrtquant.dosimetry`; this module only reads, loops and writes (atomically).

Per cycle and region
--------------------
* activity (MBq) = Σ Bq/mL × mask weight × voxel volume on that session's SPECT grid, concentration
  (Bq/mL) = mean, both at acquisition (physical decay stays in the data; fits use effective rates);
  the decay-corrected activity (to injection) is listed for reading only;
* ≥ 3 time points: fits chosen by AICc (:func:`prrtquant.dosimetry.fit_tac`); when every fit is
  unphysical, the trapezoid with physical-decay tail is used (flagged). 2 points: trapezoid + tail.
  1 point: single-time-point method (Madsen with the region's effective half-life fitted in an
  earlier cycle when there is one, else the population value; or Hänscheid). The trapezoid + tail
  is always reported as the conservative alternative;
* dose (Gy): (a) local deposition and (b) voxel-S-kernel convolution of a voxel TIA map on the SPECT
  grid of the cycle's time point nearest ``dose_map_hours`` (activity map × per-region TIA / activity
  at that time point, :func:`prrtquant.dosimetry.tia_map`), both density-corrected from the CT; (c)
  organ S-values with mass scaling (kidneys, spleen, liver, bone marrow) and the sphere model
  (lesions); ± from the TIA uncertainty (dose is linear in TIA);
* kidney BED per cycle (effective half-life of the chosen fit's terminal phase, or the STP half-life,
  or physical decay for the trapezoid), summed over cycles; cumulative kidney / bone-marrow doses
  compared with the configured limits: flagged in ``summary.json``, never decided.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import SimpleITK as sitk

from . import __version__
from . import dosimetry as D
from .io import atomic_directory, read_image, sidecar_of
from .quantify import region_stats
from .bounds import (BoundsSettings, Violation, check_activity, check_non_negative, check_tia, flag_text,
                     raise_if_any)
from .regions import RegionSettings, session_regions

log = logging.getLogger(__name__)

#: Order in which regions claim voxels of the voxel TIA map (first wins).
_MAP_ORDER = ("lesion_", "extrahepatic_", "kidney_left", "kidney_right", "spleen", "bone_marrow",
              "healthy_liver_left", "healthy_liver_right", "healthy_liver", "liver_left", "liver_right", "liver")
_FOV = "field_of_view"


class DosimetryError(ValueError):
    pass


def _num_key(name: str) -> tuple[int, str]:
    head, _, tail = name.rpartition("_")
    return (int(tail), head) if tail.isdigit() else (10**6, name)


def region_class(region: str) -> str:
    """Population half-life / S-value class of a region name."""
    if region.startswith(("lesion_", "extrahepatic_")):
        return "lesion"
    if region.startswith("kidney"):
        return "kidney"
    if region == "spleen":
        return "spleen"
    if region == "bone_marrow":
        return "bone_marrow"
    if "liver" in region:
        return "liver"
    return "other"


def _regions(rois: set[str]) -> list[str]:
    lesions = sorted((r for r in rois if r.startswith("lesion_")), key=_num_key)
    extra = sorted((r for r in rois if r.startswith("extrahepatic_")), key=_num_key)
    out = [*lesions, *extra]
    for r in ("liver", "liver_left", "liver_right"):
        if r in rois:
            out.append(r)
    if "liver" in rois:
        out.append("healthy_liver")
    for lobe in ("left", "right"):
        if f"liver_{lobe}" in rois:
            out.append(f"healthy_liver_{lobe}")
    out += [r for r in ("kidney_left", "kidney_right", "spleen", "bone_marrow") if r in rois]
    return out


def _sidecar(path: Path) -> dict[str, Any]:
    return json.loads(sidecar_of(path).read_text())


def _density_on(spect: sitk.Image, ct: sitk.Image | None, s: D.DosimetrySettings) -> sitk.Image | None:
    if s.density == "water" or ct is None:
        return None
    ct_on = sitk.Resample(ct, spect, sitk.Transform(3, sitk.sitkIdentity), sitk.sitkLinear, 0.0, sitk.sitkFloat64)
    return D.density_from_ct(ct_on, s.ct_density_slope_per_hu, s.min_density_g_ml)


def _tia_region(t: list[float], a: list[float], s: D.DosimetrySettings, injected_mbq: float, region: str,
                prior_half_life: dict[str, float]) -> tuple[dict[str, Any], list[dict[str, Any]], D.FitResult | None]:
    """TIA of one region in one cycle: the row fields, the fits.tsv rows and the chosen fit."""
    lam = D.LAMBDA_LU177_PER_H
    n = len(t)
    trap, trap_sd = D.trapezoid_tia(t, a, lam, s.trapezoid_start, s.activity_cv)
    out: dict[str, Any] = {"n_points": n, "tia_trapezoid_mbq_h": trap, "tia_trapezoid_sd_mbq_h": trap_sd,
                           "tia_hanscheid_mbq_h": math.nan, "tia_madsen_mbq_h": math.nan, "flags": ""}
    fit_rows: list[dict[str, Any]] = []
    chosen: D.FitResult | None = None
    if n >= 3:
        fits, chosen = D.fit_tac(t, a, lam, s.models, s.activity_cv, injected_mbq, s.max_tail_fraction,
                                 s.uncertainty_samples)
        fit_rows = [f.row() for f in fits]
        fitted = {f.model for f in fits}
        fit_rows += [{"model": m, "n_points": n, "n_params": D.MODELS[m].k, "chosen": False, "converged": False,
                      "physical": False,
                      "flags": f"skipped: {D.MODELS[m].k} parameters need at least {D.MODELS[m].k + 1} time points"}
                     for m in s.models if m not in fitted]  # every configured model has its row and reason
        if chosen is not None:
            out.update(tia_mbq_h=chosen.tia_mbq_h, tia_sd_mbq_h=chosen.tia_sd_mbq_h, method=f"fit:{chosen.model}",
                       effective_half_life_h=math.log(2) / chosen.terminal_rate_per_h)
        else:
            out.update(tia_mbq_h=trap, tia_sd_mbq_h=trap_sd, method="trapezoid+physical_tail",
                       effective_half_life_h=math.log(2) / lam,
                       flags="every fit unphysical: " + " | ".join(f"{f.model}: {'; '.join(f.flags)}" for f in fits))
    elif n == 2:
        out.update(tia_mbq_h=trap, tia_sd_mbq_h=trap_sd, method="trapezoid+physical_tail",
                   effective_half_life_h=math.log(2) / lam, flags="2 time points: trapezoid + physical tail")
    else:
        t1, a1 = t[0], a[0]
        cls = region_class(region)
        if s.stp_use_prior_cycle and region in prior_half_life:
            teff, src = prior_half_life[region], "prior cycle"
        else:
            pop = s.population_effective_half_life_h
            teff, src = float(pop.get(cls, pop.get("other", 50.0))), "population"
        han = D.hanscheid_tia(a1, t1)
        mad = D.madsen_tia(a1, t1, teff)
        half_cv = 0.0 if src == "prior cycle" else s.stp_half_life_cv
        out.update(tia_hanscheid_mbq_h=han, tia_madsen_mbq_h=mad)
        if s.stp_method == "madsen":
            out.update(tia_mbq_h=mad, tia_sd_mbq_h=D.madsen_tia_sd(a1, t1, teff, s.activity_cv, half_cv),
                       method=f"stp:madsen (T_eff {teff:.1f} h, {src})", effective_half_life_h=teff)
        else:
            out.update(tia_mbq_h=han, tia_sd_mbq_h=han * s.activity_cv, method="stp:hanscheid",
                       effective_half_life_h=t1 * math.log(2))
    fit_rows.append({"model": "trapezoid+physical_tail", "n_points": n, "tia_mbq_h": trap,
                     "tia_sd_mbq_h": trap_sd, "chosen": out["method"].startswith("trapezoid")})
    return out, fit_rows, chosen


def dosimetry_patient(ingest_dir: str | Path, register_dir: str | Path, out_dir: str | Path,
                      settings: D.DosimetrySettings | None = None, patient: str | None = None,
                      region_settings: RegionSettings | None = None, bounds: BoundsSettings | None = None,
                      fail_on_bounds: bool = False) -> dict[str, Any]:
    """Run the dosimetry of one patient; see the module docstring. Returns the summary dict.

    ``region_settings``: the region definition (mask kind, healthy-liver margin), the same as quantification's
    (config section ``quantify``), so both stages measure the same voxels. ``bounds``: physical
    plausibility (:mod:`prrtquant.bounds`): activity at most the administered activity decayed to the scan,
    TIA at most A0/λ, nothing negative; violations go into ``bounds_flag`` columns and ``summary.json``,
    or, with ``fail_on_bounds``, raise :class:`prrtquant.bounds.PhysicalBoundsError` (nothing written).
    """
    ing, reg = Path(ingest_dir), Path(register_dir)
    s = settings or D.DosimetrySettings()
    region_def = region_settings or RegionSettings()
    tol = (bounds or BoundsSettings()).activity_tolerance
    violations: list[Violation] = []
    inv = pd.read_csv(ing / "inventory.tsv", sep="\t", dtype=str, keep_default_na=False)
    table = pd.read_csv(reg / "masks.tsv", sep="\t", dtype=str, keep_default_na=False)
    qc = json.loads((reg / "qc.json").read_text())
    if patient is None and (ing / "sessions.json").exists():
        patient = json.loads((ing / "sessions.json").read_text()).get("patient")
    patient = patient or "anonymous"
    spect_rows = inv[inv.role == "spect"]
    if spect_rows.empty:  # e.g. a PET-only (Bordeaux) patient: nothing to integrate, said so, not an error
        note = f"{ing / 'inventory.tsv'}: no 177Lu SPECT in the ingest output: no dosimetry"
        log.warning("%s", note)
        summary = {"patient": patient, "cycles": {}, "limits": [], "limits_exceeded": [], "notes": [note], "prrtquant_version": __version__}
        with atomic_directory(out_dir) as tmp:
            for name in ("tac", "fits", "dosimetry", "dvh"):
                pd.DataFrame(columns=["cycle", "region"]).to_csv(tmp / f"{name}.tsv", sep="\t", index=False)
            (tmp / "summary.json").write_text(json.dumps(summary, indent=1))
        return summary
    lam = D.LAMBDA_LU177_PER_H
    notes: list[str] = []
    sessions: dict[int, list[dict[str, Any]]] = {}
    for row in spect_rows.itertuples():
        side = _sidecar(ing / row.path)
        if str(side.get("units")) != "Bq/mL" or str(side.get("decay_correction", "NONE")) != "NONE":
            raise DosimetryError(f"{row.path}: expected Bq/mL without decay correction, sidecar says "
                                 f"{side.get('units')!r}, decay correction {side.get('decay_correction')!r}")
        if "Lu" not in str(side.get("radionuclide", "")):
            notes.append(f"{row.session}: radionuclide {side.get('radionuclide')!r} is not 177Lu: skipped")
            continue
        ct_rows = inv[(inv.session == row.session) & (inv.role == "ct")]
        ct_path = None
        if not ct_rows.empty:
            if ct_rows.iloc[0].frame_of_reference_uid == row.frame_of_reference_uid:
                ct_path = ing / ct_rows.iloc[0].path
            else:
                notes.append(f"{row.session}: CT in another frame of reference: water density used")
        sessions.setdefault(int(side["cycle"]), []).append({
            "session": row.session, "path": ing / row.path, "hours": float(side["hours_pi"]),
            "injected_mbq": float(side["injected_activity_bq"]) / 1e6, "ct": ct_path,
            "frame_of_reference_uid": row.frame_of_reference_uid, "study_instance_uid": row.study_instance_uid,
            "injection_datetime": side.get("injection_datetime")})
    rois = set(table[table.session.isin(spect_rows.session)].roi)
    regions = _regions(rois)
    for r in ("kidney_left", "kidney_right", "spleen", "bone_marrow", "liver"):
        if r not in rois:
            notes.append(f"no {r} mask: not reported")
    tac_rows: list[dict[str, Any]] = []
    fit_rows: list[dict[str, Any]] = []
    dos_rows: list[dict[str, Any]] = []
    dvh_rows: list[pd.DataFrame] = []
    plots: list[tuple[str, str, list[float], list[float], D.FitResult | None]] = []
    maps: dict[int, dict[str, sitk.Image]] = {}
    rtdose_meta: dict[int, dict[str, Any]] = {}
    prior_half_life: dict[str, float] = {}
    kernels: dict[tuple[float, ...], np.ndarray] = {}
    for cycle in sorted(sessions):
        tps = sorted(sessions[cycle], key=lambda d: d["hours"])
        injected = tps[0]["injected_mbq"]
        if any(abs(tp["injected_mbq"] - injected) > 1e-6 * injected for tp in tps):
            notes.append(f"cycle {cycle}: injected activities differ between time points; the first is used")
        per_region: dict[str, list[tuple[float, float, str]]] = {}
        grid_tp = min(tps, key=lambda d: abs(d["hours"] - s.dose_map_hours))
        grid_data: dict[str, Any] = {}
        for tp in tps:
            spect = read_image(str(tp["path"]), sitk.sitkFloat64)
            masks, binary = session_regions(reg, table, tp["session"], region_def)
            arr = sitk.GetArrayViewFromImage(spect)
            vml = float(np.prod(spect.GetSpacing())) / 1000.0
            fov_mbq = float(np.nansum(arr)) * vml / 1e6
            measured: dict[str, float] = {_FOV: fov_mbq}
            for region in [*regions, _FOV]:
                if region == _FOV:
                    st = {"integral": fov_mbq * 1e6, "mean": float(np.nanmean(arr)), "volume_ml": arr.size * vml,
                          "fraction_in_fov": 1.0}
                else:
                    if region not in masks:
                        notes.append(f"{tp['session']}: no {region} mask on this SPECT grid")
                        continue
                    try:
                        st = region_stats(spect, masks[region])
                    except ValueError as exc:  # empty / out of the field of view
                        notes.append(f"{tp['session']} {region}: {exc}")
                        continue
                a = st["integral"] / 1e6
                measured[region] = a
                rc = math.nan
                if s.recovery_coefficients is not None and region.startswith(("lesion_", "extrahepatic_")):
                    rc = D.recovery_coefficient(st["volume_ml"], s.recovery_coefficients)
                    a = a / rc
                per_region.setdefault(region, []).append((tp["hours"], a, tp["session"]))
                found = check_activity(st["integral"] / 1e6, injected, tp["hours"], lam, tol, stage="dosimetry",
                                       region=region, where=tp["session"], source=str(tp["path"].relative_to(ing)))
                violations.extend(found)
                tac_rows.append({"cycle": cycle, "session": tp["session"], "hours_pi": tp["hours"], "region": region,
                                 "activity_mbq": a, "activity_sd_mbq": a * s.activity_cv,
                                 "activity_measured_mbq": st["integral"] / 1e6, "recovery_coefficient": rc,
                                 "concentration_bqml": st["mean"] / (1.0 if math.isnan(rc) else rc),
                                 "activity_decay_corrected_mbq": a * math.exp(lam * tp["hours"]),
                                 "volume_ml": st["volume_ml"], "fraction_in_fov": st["fraction_in_fov"],
                                 "percent_injected": 100.0 * a / injected, "bounds_flag": flag_text(found)})
            if tp is grid_tp:
                ct = read_image(str(tp["ct"])) if tp["ct"] is not None else None
                grid_data = {"spect": spect, "binary": binary, "measured": measured,
                             "density": _density_on(spect, ct, s), "tp": tp}
        # --- TIA per region
        tia: dict[str, dict[str, Any]] = {}
        chosen_fits: dict[str, D.FitResult | None] = {}
        for region, pts in per_region.items():
            t = [p[0] for p in pts]
            a = [p[1] for p in pts]
            info, frows, chosen = _tia_region(t, a, s, injected, region, prior_half_life)
            tia[region] = info
            chosen_fits[region] = chosen
            for fr in frows:
                fit_rows.append({"cycle": cycle, "region": region, **fr})
            if len(t) >= 2:
                plots.append((f"c{cycle}_{region}", f"cycle {cycle} {region}", t, a, chosen))
        for region, info in tia.items():
            if info["n_points"] >= 3 and region in chosen_fits and chosen_fits[region] is not None:
                prior_half_life[region] = info["effective_half_life_h"]
        # --- dose maps on the grid time point
        spect, binary, measured, dens = (grid_data["spect"], grid_data["binary"], grid_data["measured"],
                                         grid_data["density"])
        vml = float(np.prod(spect.GetSpacing())) / 1000.0
        act_map = sitk.GetArrayFromImage(spect) * vml / 1e6
        act_img = sitk.GetImageFromArray(act_map)
        act_img.CopyInformation(spect)

        def ratio(region: str, measured: dict[str, float] = measured,
                  tia: dict[str, dict[str, Any]] = tia) -> float:
            a_t = measured.get(region, math.nan)
            v = tia.get(region, {}).get("tia_mbq_h", math.nan)
            return v / a_t if a_t and math.isfinite(v) and math.isfinite(a_t) and a_t > 0 else math.nan

        ordered: list[tuple[sitk.Image, float]] = []
        for key in _MAP_ORDER:
            names = sorted((r for r in binary if r.startswith(key)), key=_num_key) if key.endswith("_") else (
                [key] if key in binary else [])
            for r in names:
                rr = ratio(r)
                if math.isfinite(rr):
                    ordered.append((binary[r], rr))
        default = ratio(_FOV)
        if not math.isfinite(default):
            default = 1.0 / lam
            notes.append(f"cycle {cycle}: no field-of-view kinetics, physical decay used outside the regions")
        tmap = D.tia_map(act_img, ordered, default)
        local = D.local_deposition_dose(tmap, dens)
        sp_key = tuple(round(v, 6) for v in spect.GetSpacing())
        if sp_key not in kernels:
            kernels[sp_key] = D.lu177_voxel_kernel(spect.GetSpacing(), s.kernel_radius_mm, s.kernel_photons,
                                                s.electron_mean_range_mm, n_samples=s.kernel_samples)
        kern = D.kernel_dose(tmap, kernels[sp_key], dens)
        maps[cycle] = {"tia_map_mbq_h": tmap, "dose_local_gy": local, "dose_kernel_gy": kern}
        if dens is not None:
            maps[cycle]["density_g_ml"] = dens
        rtdose_meta[cycle] = grid_data["tp"]
        for region in [*regions, _FOV]:
            if region not in tia:
                continue
            info = tia[region]
            v, sd = info["tia_mbq_h"], info["tia_sd_mbq_h"]
            rel = sd / v if v and math.isfinite(v) and math.isfinite(sd) else math.nan
            row = {"cycle": str(cycle), "region": region, "session_dose_grid": grid_data["tp"]["session"],
                                   "injected_mbq": injected, "method": info["method"], "n_points": info["n_points"],
                                   "tia_mbq_h": v, "tia_sd_mbq_h": sd, "tia_coefficient_h": v / injected,
                                   "residence_time_h": v / injected,
                                   "tia_trapezoid_mbq_h": info["tia_trapezoid_mbq_h"],
                                   "tia_trapezoid_sd_mbq_h": info["tia_trapezoid_sd_mbq_h"],
                                   "tia_hanscheid_mbq_h": info["tia_hanscheid_mbq_h"],
                                   "tia_madsen_mbq_h": info["tia_madsen_mbq_h"],
                                   "effective_half_life_h": info["effective_half_life_h"], "flags": info["flags"]}
            for m in ("local", "kernel", "svalue"):
                row[f"dose_{m}_gy"] = row[f"dose_{m}_sd_gy"] = math.nan
            row["mass_g"] = math.nan
            if region != _FOV and region in binary:
                try:
                    for m, img in (("local", local), ("kernel", kern)):
                        rd = D.region_dose(img, binary[region], dens)
                        row[f"dose_{m}_gy"] = rd["mean_gy"]
                        row[f"dose_{m}_sd_gy"] = rd["mean_gy"] * rel
                        row["mass_g"] = rd["mass_g"]
                        dvh = D.dvh(img, binary[region], s.dvh_bin_gy)
                        dvh.insert(0, "method", m)
                        dvh.insert(0, "region", region)
                        dvh.insert(0, "cycle", cycle)
                        dvh_rows.append(dvh)
                    cls = region_class(region)
                    mass = row["mass_g"]
                    sv = D.sphere_s_value(mass) if cls == "lesion" else (
                        D.organ_s_value(cls, mass) if cls in D.ORGAN_S_TABLE else math.nan)
                    row["dose_svalue_gy"] = v * sv
                    row["dose_svalue_sd_gy"] = v * sv * rel
                    row["svalue_model"] = "sphere" if cls == "lesion" else (cls if cls in D.ORGAN_S_TABLE else "")
                except ValueError as exc:
                    notes.append(f"cycle {cycle} {region}: no dose on {grid_data['tp']['session']}: {exc}")
            if region.startswith("kidney"):
                teff = info["effective_half_life_h"]
                for m in ("local", "kernel", "svalue"):
                    row[f"bed_{m}_gy"] = D.bed(row[f"dose_{m}_gy"], teff, s.alpha_beta_gy, s.repair_half_time_h)
            row["bounds_flag"] = _bounds_flag(row, injected, lam, tol, f"cycle {cycle}", violations)
            dos_rows.append(row)
    # --- cumulative rows and limits
    dos = pd.DataFrame(dos_rows)
    limits: list[dict[str, Any]] = []
    cum_rows: list[dict[str, Any]] = []
    if not dos.empty:
        for region, g in dos.groupby("region", sort=False):
            row = {"cycle": "cumulative", "region": region, "n_cycles": len(g),
                   "method": "; ".join(f"c{c}:{m}" for c, m in zip(g.cycle, g.method)),
                   "tia_mbq_h": g.tia_mbq_h.sum(), "tia_sd_mbq_h": math.sqrt((g.tia_sd_mbq_h ** 2).sum()),
                   "injected_mbq": g.injected_mbq.sum()}
            row["tia_coefficient_h"] = row["residence_time_h"] = row["tia_mbq_h"] / row["injected_mbq"]
            for m in ("local", "kernel", "svalue"):
                row[f"dose_{m}_gy"] = g[f"dose_{m}_gy"].sum(skipna=False)
                row[f"dose_{m}_sd_gy"] = math.sqrt((g[f"dose_{m}_sd_gy"] ** 2).sum(skipna=False))
                if f"bed_{m}_gy" in g and region.startswith("kidney"):
                    row[f"bed_{m}_gy"] = g[f"bed_{m}_gy"].sum(skipna=False)
            checks: list[tuple[str, float, str]] = []
            if region.startswith("kidney"):
                checks.append(("dose", s.kidney_limit_gy, "dose"))
                if s.kidney_bed_limit_gy is not None:
                    checks.append(("bed", s.kidney_bed_limit_gy, "bed"))
            elif region == "bone_marrow":
                checks.append(("dose", s.bone_marrow_limit_gy, "dose"))
            flags = []
            for quantity, limit, prefix in checks:
                for m in ("local", "kernel", "svalue"):
                    val = row.get(f"{prefix}_{m}_gy", math.nan)
                    over = bool(math.isfinite(val) and val > limit)
                    limits.append({"region": region, "quantity": quantity, "method": m, "value_gy": val,
                                   "limit_gy": limit, "exceeded": over})
                    if over:
                        flags.append(f"{quantity} {m} {val:.2f} Gy > limit {limit:g} Gy")
            row["limit_gy"] = checks[0][1] if checks else math.nan
            row["limit_flags"] = "; ".join(flags)
            row["bounds_flag"] = _bounds_flag(row, row["injected_mbq"], lam, tol, "cumulative", violations)
            cum_rows.append(row)
    dos_all = pd.concat([dos, pd.DataFrame(cum_rows)], ignore_index=True) if cum_rows else dos
    if fail_on_bounds:
        raise_if_any(violations, f"{ing}")
    upstream = json.loads((ing / "sessions.json").read_text()).get("physical_bounds") or [] if (
        ing / "sessions.json").exists() else []
    for v in violations:
        log.warning("%s", v.message)
    exceeded = [x for x in limits if x["exceeded"]]
    summary = {"patient": patient, "cycles": {str(c): {"injected_mbq": sessions[c][0]["injected_mbq"],
                                                       "time_points": [tp["session"] for tp in sorted(
                                                           sessions[c], key=lambda d: d["hours"])],
                                                       "dose_grid_session": rtdose_meta[c]["session"]}
                                              for c in sorted(sessions)},
               "regions": regions, "limits": limits, "limits_flagged": bool(exceeded),
               "limits_exceeded": exceeded, "registration_flagged": bool(qc.get("flagged", False)),
               "physical_bounds": upstream + [v.as_dict() for v in violations],
               "physical_bounds_flagged": bool(upstream or violations),
               "notes": notes, "settings": asdict(s), "region_definition": asdict(region_def),
               "constants": {"electron_kev_per_decay": D.ELECTRON_KEV_PER_DECAY,
                             "local_deposition_mgy_kg_per_mbq_h": D.LOCAL_DEPOSITION_MGY_KG_PER_MBQ_H,
                             "lambda_per_h": lam, "sphere_s_table_gy_per_mbq_h": D.SPHERE_S_TABLE,
                             "organ_s_table_gy_per_mbq_h": D.ORGAN_S_TABLE,
                             "organ_reference_mass_g": D.ORGAN_REFERENCE_MASS_G},
               "prrtquant_version": __version__}
    with atomic_directory(out_dir) as tmp:
        pd.DataFrame(tac_rows).to_csv(tmp / "tac.tsv", sep="\t", index=False)
        pd.DataFrame(fit_rows).to_csv(tmp / "fits.tsv", sep="\t", index=False)
        dos_all.to_csv(tmp / "dosimetry.tsv", sep="\t", index=False)
        (pd.concat(dvh_rows, ignore_index=True) if dvh_rows else pd.DataFrame(
            columns=["cycle", "region", "method", "dose_gy", "volume_fraction", "volume_ml"])).to_csv(
            tmp / "dvh.tsv", sep="\t", index=False)
        for cycle, imgs in maps.items():
            d = tmp / "dose" / str(cycle)
            d.mkdir(parents=True)
            for name, img in imgs.items():
                sitk.WriteImage(sitk.Cast(img, sitk.sitkFloat32), str(d / f"{name}.nii.gz"), useCompression=True)
            if s.rtdose:
                tp = rtdose_meta[cycle]
                for m in ("local", "kernel"):
                    D.write_rtdose(imgs[f"dose_{m}_gy"], d / f"rtdose_{m}.dcm", tp["frame_of_reference_uid"],
                                   patient_name=patient, patient_id=patient,
                                   study_instance_uid=tp["study_instance_uid"],
                                   series_description=f"177Lu cycle {cycle} dose ({m})",
                                   uid_seed=(patient, cycle, m, tp["session"]), comment=f"cycle {cycle} {m}")
        if s.plots:
            (tmp / "tac").mkdir()
            for name, title, t, a, fit in plots:
                D.tac_plot(tmp / "tac" / f"{name}.png", title, t, a, fit,
                           [v * s.activity_cv for v in a])
        (tmp / "summary.json").write_text(json.dumps(_finite(summary), indent=1, default=_json_default))
    return summary


def _bounds_flag(row: dict[str, Any], injected_mbq: float, lam: float, tol: float, where: str,
                 violations: list[Violation]) -> str:
    """Physical bounds of one dosimetry.tsv row (TIA ≤ A0/λ, TIA, doses and BED ≥ 0), as its flag text."""
    region = str(row["region"])
    found = check_tia(row["tia_mbq_h"], injected_mbq, lam, tol, stage="dosimetry", region=region, where=where)
    for key in ("dose_local_gy", "dose_kernel_gy", "dose_svalue_gy", "bed_local_gy", "bed_kernel_gy", "bed_svalue_gy"):
        if key in row:
            found += check_non_negative(row[key], key, "Gy", stage="dosimetry", region=region, where=where)
    violations.extend(found)
    return flag_text(found)


def _finite(o: Any) -> Any:
    """NaN / inf → None (null) everywhere, so summary.json is strict JSON."""
    if isinstance(o, dict):
        return {str(k): _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    if isinstance(o, (float, np.floating)):
        return float(o) if math.isfinite(float(o)) else None
    return o


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return str(o)
