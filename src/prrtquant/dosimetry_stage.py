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
* the VOI of every time point is the fractional propagation of the one drawn mask (``fixed_voi``), its
  volume per time point in ``tac.tsv`` and flagged beyond ``voi_volume_tolerance``;
* ≥ 3 time points: fits chosen by :func:`prrtquant.dosimetry.select_fit` (AICc where defined, else the
  fewest parameters passing χ²); when every fit is
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
from dataclasses import asdict, replace
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


def _fit_rows(fits: list[D.FitResult], s: D.DosimetrySettings, n: int) -> list[dict[str, Any]]:
    """fits.tsv rows: every configured model, those with too few points 'skipped' with the reason."""
    rows = [f.row() for f in fits]
    fitted = {f.model for f in fits}
    crit = fits[0].criterion if fits else ""
    rows += [{"model": m, "n_points": n, "n_params": D.MODELS[m].k, "chosen": False, "converged": False,
              "physical": False, "criterion": crit,
              "flags": f"skipped: {D.MODELS[m].k} parameters need at least {D.MODELS[m].k + 1} time points"}
             for m in s.models if m not in fitted]
    return rows


def _stp(t1: float, a1: float, s: D.DosimetrySettings, region: str,
         prior: dict[str, tuple[float, float]]) -> dict[str, Any]:
    """Single-time-point TIA: Madsen with the prior cycle's (or the population's) T_eff, or Hänscheid; the
    uncertainty of the assumed T_eff is part of the random component."""
    cls = region_class(region)
    if s.stp_use_prior_cycle and region in prior:
        teff, fit_cv = prior[region]
        src = "prior cycle"
        if not math.isfinite(fit_cv):  # the prior fit's rate uncertainty unknown: the population's instead
            fit_cv, src = s.stp_half_life_cv, "prior cycle, its fit uncertainty unknown: population cv"
        half_cv = D.combine_relative(fit_cv, s.stp_prior_cycle_half_life_cv)
    else:
        pop = s.population_effective_half_life_h
        teff, half_cv, src = float(pop.get(cls, pop.get("other", 50.0))), s.stp_half_life_cv, "population"
    han = D.hanscheid_tia(a1, t1)
    mad = D.madsen_tia(a1, t1, teff)
    out: dict[str, Any] = {"tia_hanscheid_mbq_h": han, "tia_madsen_mbq_h": mad,
                           "assumed_half_life_cv": half_cv if s.stp_method == "madsen" else math.nan}
    if s.stp_method == "madsen":
        out.update(tia_mbq_h=mad, tia_sd_random_mbq_h=D.madsen_tia_sd(a1, t1, teff, s.activity_cv, half_cv),
                   method="stp:madsen", method_detail=f"T_eff {teff:.1f} h ({src}, ±{100 * half_cv:.0f} %)",
                   effective_half_life_h=teff)
    else:
        out.update(tia_mbq_h=han, tia_sd_random_mbq_h=han * s.activity_cv, method="stp:hanscheid",
                   method_detail=f"Ã = A(t)·2t/ln2 at t = {t1:.1f} h (exact for T_eff = t)", effective_half_life_h=t1)
    if abs(han - mad) > s.stp_agreement * mad:
        out["flags"] = (f"single time point: Hänscheid {han:.4g} and Madsen {mad:.4g} MBq·h differ by "
                        f"{100 * (han / mad - 1):+.0f} % (> {100 * s.stp_agreement:.0f} %): the kinetics differ "
                        f"from both assumptions")
    return out


def _tia_region(t: list[float], a: list[float], s: D.DosimetrySettings, injected_mbq: float, region: str,
                prior_half_life: dict[str, tuple[float, float]], recovery_rel_sd: float = 0.0
                ) -> tuple[dict[str, Any], list[dict[str, Any]], D.FitResult | None]:
    """TIA of one region in one cycle: the row fields, the fits.tsv rows and the chosen fit.

    Uncertainty (EANM, Gear et al. 2018): a *random* part (activity noise through the fit by bootstrap, or
    through the single-time-point formula with the assumed T_eff's uncertainty), the *calibration* part
    (``calibration_cv``, the same for every time point) and, with partial-volume correction, the
    *recovery* part (the VOI volume's uncertainty through RC(V) and the curve's residual), combined in
    quadrature into ``tia_sd_mbq_h``.
    """
    lam = D.LAMBDA_LU177_PER_H
    n = len(t)
    trap, trap_sd = D.trapezoid_tia(t, a, lam, s.trapezoid_start, s.activity_cv)
    out: dict[str, Any] = {"n_points": n, "tia_trapezoid_mbq_h": trap, "tia_trapezoid_sd_mbq_h": trap_sd,
                           "tia_hanscheid_mbq_h": math.nan, "tia_madsen_mbq_h": math.nan, "flags": "",
                           "method_detail": "", "assumed_half_life_cv": math.nan}
    fit_rows: list[dict[str, Any]] = []
    chosen: D.FitResult | None = None
    if n >= 3:
        fits, chosen = D.fit_tac(t, a, lam, s.models, s.activity_cv, injected_mbq, s.max_tail_fraction,
                                 s.uncertainty_samples)
        fit_rows = _fit_rows(fits, s, n)
        if chosen is not None:
            out.update(tia_mbq_h=chosen.tia_mbq_h, tia_sd_random_mbq_h=chosen.tia_sd_mbq_h,
                       method=f"fit:{chosen.model}", method_detail=chosen.criterion,
                       effective_half_life_h=math.log(2) / chosen.terminal_rate_per_h,
                       flags="; ".join(chosen.flags))
        else:
            out.update(tia_mbq_h=trap, tia_sd_random_mbq_h=trap_sd, method="trapezoid+physical_tail",
                       effective_half_life_h=math.log(2) / lam,
                       flags="every fit unphysical: " + " | ".join(f"{f.model}: {'; '.join(f.flags)}" for f in fits))
    elif n == 2:
        out.update(tia_mbq_h=trap, tia_sd_random_mbq_h=trap_sd, method="trapezoid+physical_tail",
                   effective_half_life_h=math.log(2) / lam, flags="2 time points: trapezoid + physical tail")
    else:
        out.update(_stp(t[0], a[0], s, region, prior_half_life))
    v = out["tia_mbq_h"]
    rel_random = out["tia_sd_random_mbq_h"] / v if v else math.nan
    out.update(tia_sd_calibration_mbq_h=v * s.calibration_cv, tia_sd_recovery_mbq_h=v * recovery_rel_sd)
    out["tia_sd_mbq_h"] = v * D.combine_relative(rel_random, s.calibration_cv, recovery_rel_sd)
    fit_rows.append({"model": "trapezoid+physical_tail", "n_points": n, "tia_mbq_h": trap,
                     "tia_sd_mbq_h": trap_sd, "chosen": out["method"].startswith("trapezoid")})
    return out, fit_rows, chosen


def dosimetry_patient(ingest_dir: str | Path, register_dir: str | Path, out_dir: str | Path,
                      settings: D.DosimetrySettings | None = None, patient: str | None = None,
                      region_settings: RegionSettings | None = None, bounds: BoundsSettings | None = None,
                      fail_on_bounds: bool = False) -> dict[str, Any]:
    """Run the dosimetry of one patient; see the module docstring. Returns the summary dict.

    ``region_settings``: the region definition (mask kind, healthy-liver margin), the same as quantification's
    (config section ``quantify``). With ``settings.fixed_voi`` (default) the activities are measured with the
    fractional masks (the same physical VOI at every time point, the same margin); with it off, with the
    region definition itself, so both stages measure the same voxels. ``bounds``: physical
    plausibility (:mod:`prrtquant.bounds`): activity at most the administered activity decayed to the scan,
    TIA at most A0/λ, nothing negative; violations go into ``bounds_flag`` columns and ``summary.json``,
    or, with ``fail_on_bounds``, raise :class:`prrtquant.bounds.PhysicalBoundsError` (nothing written).
    """
    ing, reg = Path(ingest_dir), Path(register_dir)
    s = settings or D.DosimetrySettings()
    region_def = region_settings or RegionSettings()
    # fixed VOIs: the fractional propagation of the drawn masks, wherever the registration wrote it
    measure_def = replace(region_def, mask_kind="fractional") if s.fixed_voi else region_def
    recovery = (D.RecoveryCurve.fit(s.recovery_coefficients, s.recovery_fit)
                if s.recovery_coefficients is not None else None)
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
    prior_half_life: dict[str, tuple[float, float]] = {}
    grid_voi_sessions: list[str] = []
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
            use = measure_def
            if measure_def.mask_kind == "fractional" and not ((table.session == tp["session"]) & (
                    table.kind == "fractional")).any():
                use = replace(measure_def, mask_kind="binary")
                notes.append(f"{tp['session']}: no fractional masks from the registration: binary VOIs of this grid "
                             "(not a fixed VOI)")
                grid_voi_sessions.append(tp["session"])
            masks, binary = session_regions(reg, table, tp["session"], use)
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
                if recovery is not None and region.startswith(("lesion_", "extrahepatic_")):
                    rc = recovery(st["volume_ml"])
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
        voi = _voi_volumes(tac_rows, cycle, s)
        # --- TIA per region
        tia: dict[str, dict[str, Any]] = {}
        chosen_fits: dict[str, D.FitResult | None] = {}
        for region, pts in per_region.items():
            t = [p[0] for p in pts]
            a = [p[1] for p in pts]
            rc_vol = rc_res = 0.0  # relative RC uncertainty from the VOI volume and from the curve's residual
            if recovery is not None and region.startswith(("lesion_", "extrahepatic_")):
                v_ml = voi[region]["volume_ml"]
                rc_vol = abs(recovery.log_slope(v_ml)) * D.volume_relative_sd(v_ml, s.voi_boundary_sd_mm)
                rc_res = recovery.residual_sd
            info, frows, chosen = _tia_region(t, a, s, injected, region, prior_half_life,
                                              D.combine_relative(rc_vol, rc_res))
            info.update(rc_volume_rel=rc_vol, rc_residual_rel=rc_res)
            if voi.get(region, {}).get("flag"):
                info["flags"] = "; ".join(x for x in (info["flags"], voi[region]["flag"]) if x)
            tia[region] = info
            chosen_fits[region] = chosen
            for fr in frows:
                fit_rows.append({"cycle": cycle, "region": region, **fr})
            if len(t) >= 2:
                plots.append((f"c{cycle}_{region}", f"cycle {cycle} {region}", t, a, chosen))
        for region, info in tia.items():
            fit = chosen_fits.get(region)
            if info["n_points"] >= 3 and fit is not None:
                prior_half_life[region] = (info["effective_half_life_h"], fit.terminal_rate_cv)
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
                                   "method_detail": info["method_detail"],
                                   "tia_mbq_h": v, "tia_sd_mbq_h": sd,
                                   "tia_sd_random_mbq_h": info["tia_sd_random_mbq_h"],
                                   "tia_sd_calibration_mbq_h": info["tia_sd_calibration_mbq_h"],
                                   "tia_sd_recovery_mbq_h": info["tia_sd_recovery_mbq_h"],
                                   "assumed_half_life_cv": info["assumed_half_life_cv"],
                                   "recovery_volume_rel": info["rc_volume_rel"],
                                   "recovery_residual_rel": info["rc_residual_rel"],
                                   "voi_volume_ml": voi.get(region, {}).get("volume_ml", math.nan),
                                   "voi_volume_spread": voi.get(region, {}).get("spread", math.nan),
                                   "partial_volume_correction": _pvc_text(region, recovery, voi),
                                   "tia_coefficient_h": v / injected,
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
                    row["mass_rel_sd"] = D.volume_relative_sd(row["voi_volume_ml"], s.voi_boundary_sd_mm)
                    # D = Ã(V)·S(m(V)): the RC's and the mass's volume terms come from one volume error and
                    # push the dose the same way (larger V: larger RC, smaller Ã; larger m): added linearly
                    rel_rand = info["tia_sd_random_mbq_h"] / v if v else math.nan
                    row["dose_svalue_sd_gy"] = v * sv * D.combine_relative(
                        rel_rand, s.calibration_cv, info["rc_residual_rel"], info["rc_volume_rel"] + row["mass_rel_sd"])
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
                   "tia_mbq_h": g.tia_mbq_h.sum(), "injected_mbq": g.injected_mbq.sum(),
                   "tia_sd_random_mbq_h": math.sqrt((g.tia_sd_random_mbq_h ** 2).sum(skipna=False)),
                   "tia_sd_calibration_mbq_h": g.tia_sd_calibration_mbq_h.sum(skipna=False),
                   "tia_sd_recovery_mbq_h": g.tia_sd_recovery_mbq_h.sum(skipna=False),
                   "partial_volume_correction": "; ".join(dict.fromkeys(
                       str(v).split(":")[0] if str(v).startswith("RC ") else str(v)
                       for v in g.partial_volume_correction))}
            row["tia_sd_mbq_h"] = math.sqrt(sum(row[f"tia_sd_{c}_mbq_h"] ** 2 for c in ("random", "calibration",
                                                                                        "recovery")))
            row["tia_coefficient_h"] = row["residence_time_h"] = row["tia_mbq_h"] / row["injected_mbq"]
            for m in ("local", "kernel", "svalue"):
                row[f"dose_{m}_gy"] = g[f"dose_{m}_gy"].sum(skipna=False)
                row[f"dose_{m}_sd_gy"] = _cumulative_dose_sd(g, m)
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
               "voi": {"fixed": measure_def.mask_kind == "fractional" and not grid_voi_sessions,
                       "masks": measure_def.mask_kind, "binary_sessions": grid_voi_sessions, "volume_tolerance": s.voi_volume_tolerance,
                       "flags": sorted({f"cycle {r['cycle']} {r['region']}: {r['voi_flag']}" for r in tac_rows
                                        if r.get("voi_flag")})},
               "partial_volume_correction": recovery.describe() if recovery is not None else "none",
               "notes": notes, "settings": asdict(s), "region_definition": asdict(region_def),
               "measured_with": asdict(measure_def),
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


def _voi_volumes(tac_rows: list[dict[str, Any]], cycle: int, s: D.DosimetrySettings) -> dict[str, dict[str, Any]]:
    """Per region of one cycle: median VOI volume over its time points, the largest relative deviation
    from it (``spread``) and a flag when that exceeds ``voi_volume_tolerance``; the tac.tsv rows of the
    cycle get ``voi_volume_deviation`` and ``voi_flag``."""
    rows = [r for r in tac_rows if r["cycle"] == cycle and r["region"] != _FOV]
    out: dict[str, dict[str, Any]] = {}
    for region in dict.fromkeys(r["region"] for r in rows):
        mine = [r for r in rows if r["region"] == region]
        med = float(np.median([r["volume_ml"] for r in mine]))
        for r in mine:
            r["voi_volume_deviation"] = r["volume_ml"] / med - 1.0 if med > 0 else math.nan
            r["voi_flag"] = (f"VOI volume {r['volume_ml']:.4g} mL differs from the cycle's median {med:.4g} mL by "
                             f"{100 * r['voi_volume_deviation']:+.1f} %" if abs(r["voi_volume_deviation"]) >
                             s.voi_volume_tolerance else "")
        spread = max(abs(r["voi_volume_deviation"]) for r in mine)
        flag = (f"VOI volume varies by up to {100 * spread:.1f} % between time points (> "
                f"{100 * s.voi_volume_tolerance:.0f} %)" if spread > s.voi_volume_tolerance else "")
        out[region] = {"volume_ml": med, "spread": spread, "flag": flag}
    return out


def _pvc_text(region: str, recovery: D.RecoveryCurve | None, voi: dict[str, dict[str, Any]]) -> str:
    """What partial-volume correction a dosimetry.tsv row carries, in words."""
    if not region.startswith(("lesion_", "extrahepatic_")):
        return "none (organ)"
    if recovery is None:
        return "none (dosimetry.recovery_coefficients not set)"
    v = voi.get(region, {}).get("volume_ml", math.nan)
    return f"RC {recovery(v):.3f} at {v:.3g} mL: {recovery.describe()}"


def _cumulative_dose_sd(g: pd.DataFrame, method: str) -> float:
    """Cumulative dose uncertainty: random parts in quadrature over cycles, the systematic parts
    (calibration, the RC curve's residual, the VOI volume through RC(V) and, for S-values, through the mass:
    these two added linearly, one volume error) added linearly, as fully correlated between cycles."""
    dose = g[f"dose_{method}_gy"].to_numpy(float)
    tia = g.tia_mbq_h.to_numpy(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        r_rand = g.tia_sd_random_mbq_h.to_numpy(float) / tia
    r_cal = g.tia_sd_calibration_mbq_h.to_numpy(float) / np.where(tia != 0, tia, np.nan)
    r_res = g.recovery_residual_rel.to_numpy(float)
    r_vol = g.recovery_volume_rel.to_numpy(float)
    if method == "svalue":
        r_vol = r_vol + (g["mass_rel_sd"].to_numpy(float) if "mass_rel_sd" in g else np.nan)
    parts = (dose, r_rand, r_cal, r_res, r_vol)
    if not all(np.all(np.isfinite(p)) for p in parts):
        return math.nan
    return float(math.sqrt(np.sum((dose * r_rand) ** 2) + np.sum(dose * r_cal) ** 2 + np.sum(dose * r_res) ** 2
                           + np.sum(dose * r_vol) ** 2))


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
