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

import logging
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import SimpleITK as sitk

from .. import __version__
from .. import dosimetry as D
from ..bounds import (
    BoundsSettings,
    Violation,
    check_activity,
    check_non_negative,
    check_tia,
    flag_text,
    raise_if_any,
)
from ..dicom.rtdose import write_rtdose
from ..errors import DosimetryError
from ..geometry import voxel_volume_ml
from ..roi_names import numbered
from ..io import atomic_directory, read_image
from ..quantify import region_stats
from . import layout
from .regions import RegionSettings, session_regions

log = logging.getLogger(__name__)

#: Order in which regions claim voxels of the voxel TIA map (first wins).
_MAP_ORDER = ("lesion_", "extrahepatic_", "kidney_left", "kidney_right", "spleen", "bone_marrow",
              "healthy_liver_left", "healthy_liver_right", "healthy_liver", "liver_left", "liver_right", "liver")
_FOV = "field_of_view"


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
    lesions = numbered(rois, "lesion_")
    extra = numbered(rois, "extrahepatic_")
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


@dataclass
class _Patient:
    """One patient's dosimetry: the settings and inputs every step reads, and the rows, notes and flags the
    steps append to (the outputs list them in the order the steps run)."""

    ing: Path
    reg: Path
    s: D.DosimetrySettings
    region_def: RegionSettings
    measure_def: RegionSettings
    recovery: D.RecoveryCurve | None
    tol: float
    patient: str
    inv: pd.DataFrame
    table: pd.DataFrame
    qc: dict[str, Any]
    sessions: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    regions: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    violations: list[Violation] = field(default_factory=list)
    tac_rows: list[dict[str, Any]] = field(default_factory=list)
    fit_rows: list[dict[str, Any]] = field(default_factory=list)
    dos_rows: list[dict[str, Any]] = field(default_factory=list)
    dvh_rows: list[pd.DataFrame] = field(default_factory=list)
    plots: list[tuple[str, str, list[float], list[float], D.FitResult | None]] = field(default_factory=list)
    maps: dict[int, dict[str, sitk.Image]] = field(default_factory=dict)
    rtdose_meta: dict[int, dict[str, Any]] = field(default_factory=dict)
    prior_half_life: dict[str, tuple[float, float]] = field(default_factory=dict)
    grid_voi_sessions: list[str] = field(default_factory=list)
    kernels: dict[tuple[float, ...], np.ndarray] = field(default_factory=dict)


@dataclass
class _DoseGrid:
    """The time point of a cycle the dose maps are computed on: its SPECT, binary masks, measured activities
    (MBq, before recovery correction) and density (None: water)."""

    spect: sitk.Image
    binary: dict[str, sitk.Image]
    measured: dict[str, float]
    density: sitk.Image | None
    tp: dict[str, Any]


@dataclass
class _Cycle:
    """One treatment cycle: its time points (by hours after injection), the injected activity and what the
    steps add: per-region TAC points, VOI volumes, TIA, the chosen fits and the dose maps."""

    cycle: int
    tps: list[dict[str, Any]]
    injected: float
    grid_tp: dict[str, Any]
    per_region: dict[str, list[tuple[float, float, str]]] = field(default_factory=dict)
    grid: _DoseGrid | None = None
    voi: dict[str, dict[str, Any]] = field(default_factory=dict)
    tia: dict[str, dict[str, Any]] = field(default_factory=dict)
    chosen_fits: dict[str, D.FitResult | None] = field(default_factory=dict)
    local: sitk.Image | None = None
    kern: sitk.Image | None = None


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
    ctx = _read_patient(Path(ingest_dir), Path(register_dir), settings or D.DosimetrySettings(),
                        region_settings or RegionSettings(), bounds, patient)
    spect_rows = ctx.inv[ctx.inv.role == "spect"]
    if spect_rows.empty:  # e.g. a PET-only (Bordeaux) patient: nothing to integrate, said so, not an error
        return _write_without_spect(ctx, out_dir)
    _group_sessions(ctx, spect_rows)
    _select_regions(ctx, spect_rows)
    for cycle in sorted(ctx.sessions):
        cyc = _measure_cycle(ctx, cycle)
        _integrate_cycle(ctx, cyc)
        _dose_maps(ctx, cyc)
        _dose_rows(ctx, cyc)
    dos = pd.DataFrame(ctx.dos_rows)
    cum_rows, limits = _cumulative_rows(ctx, dos)
    dos_all = pd.concat([dos, pd.DataFrame(cum_rows)], ignore_index=True) if cum_rows else dos
    if fail_on_bounds:
        raise_if_any(ctx.violations, f"{ctx.ing}")
    summary = _summary(ctx, limits)
    _write_outputs(ctx, out_dir, dos_all, summary)
    return summary


def _read_patient(ing: Path, reg: Path, s: D.DosimetrySettings, region_def: RegionSettings,
                  bounds: BoundsSettings | None, patient: str | None) -> _Patient:
    """The run's settings and its inputs: the ingest inventory, the registration's masks table and QC, the
    patient name (given, else from the ingest sessions, else 'anonymous')."""
    # fixed VOIs: the fractional propagation of the drawn masks, wherever the registration wrote it
    measure_def = replace(region_def, mask_kind="fractional") if s.fixed_voi else region_def
    recovery = (D.RecoveryCurve.fit(s.recovery_coefficients, s.recovery_fit)
                if s.recovery_coefficients is not None else None)
    tol = (bounds or BoundsSettings()).activity_tolerance
    inv = layout.INVENTORY.read(ing)
    table = layout.MASKS.read(reg)
    qc = layout.REGISTRATION_QC.read(reg)
    if patient is None and layout.SESSIONS.exists(ing):
        patient = layout.SESSIONS.read(ing).get("patient")
    return _Patient(ing, reg, s, region_def, measure_def, recovery, tol, patient or "anonymous", inv, table,
                    qc)


def _write_without_spect(ctx: _Patient, out_dir: str | Path) -> dict[str, Any]:
    """Output of a patient without 177Lu SPECT: empty tables and a summary saying so; the summary."""
    note = f"{ctx.ing / 'inventory.tsv'}: no 177Lu SPECT in the ingest output: no dosimetry"
    log.warning("%s", note)
    summary = {"patient": ctx.patient, "cycles": {}, "limits": [], "limits_exceeded": [], "notes": [note],
               "prrtquant_version": __version__}
    with atomic_directory(out_dir) as tmp:
        for table_file in (layout.TAC, layout.FITS, layout.DOSIMETRY, layout.DVH):
            table_file.write(tmp, pd.DataFrame(columns=["cycle", "region"]))
        layout.DOSIMETRY_SUMMARY.write(tmp, summary)
    return summary


def _group_sessions(ctx: _Patient, spect_rows: pd.DataFrame) -> None:
    """``ctx.sessions``: the 177Lu SPECT time points per cycle (sidecar values, the session's CT when in the
    same frame of reference); other radionuclides are skipped, with a note."""
    ing, inv = ctx.ing, ctx.inv
    for row in spect_rows.itertuples():
        side = layout.read_sidecar(ing / row.path)
        if str(side.get("units")) != "Bq/mL" or str(side.get("decay_correction", "NONE")) != "NONE":
            raise DosimetryError(f"{row.path}: expected Bq/mL without decay correction, sidecar says "
                                 f"{side.get('units')!r}, decay correction {side.get('decay_correction')!r}")
        if "Lu" not in str(side.get("radionuclide", "")):
            ctx.notes.append(f"{row.session}: radionuclide {side.get('radionuclide')!r} is not 177Lu: "
                             "skipped")
            continue
        ct_rows = inv[(inv.session == row.session) & (inv.role == "ct")]
        ct_path = None
        if not ct_rows.empty:
            if ct_rows.iloc[0].frame_of_reference_uid == row.frame_of_reference_uid:
                ct_path = ing / ct_rows.iloc[0].path
            else:
                ctx.notes.append(f"{row.session}: CT in another frame of reference: water density used")
        ctx.sessions.setdefault(int(side["cycle"]), []).append({
            "session": row.session, "path": ing / row.path, "hours": float(side["hours_pi"]),
            "injected_mbq": float(side["injected_activity_bq"]) / 1e6, "ct": ct_path,
            "frame_of_reference_uid": row.frame_of_reference_uid, "study_instance_uid": row.study_instance_uid,
            "injection_datetime": side.get("injection_datetime")})


def _select_regions(ctx: _Patient, spect_rows: pd.DataFrame) -> None:
    """``ctx.regions``: the regions with a mask on some SPECT grid, in report order; missing organs noted."""
    rois = set(ctx.table[ctx.table.session.isin(spect_rows.session)].roi)
    ctx.regions = _regions(rois)
    for r in ("kidney_left", "kidney_right", "spleen", "bone_marrow", "liver"):
        if r not in rois:
            ctx.notes.append(f"no {r} mask: not reported")


def _measure_cycle(ctx: _Patient, cycle: int) -> _Cycle:
    """Every region's activity at every time point of ``cycle`` (tac.tsv rows), its VOI volumes, the dose
    grid (the time point nearest ``dose_map_hours``)."""
    tps = sorted(ctx.sessions[cycle], key=lambda d: d["hours"])
    injected = tps[0]["injected_mbq"]
    if any(abs(tp["injected_mbq"] - injected) > 1e-6 * injected for tp in tps):
        ctx.notes.append(f"cycle {cycle}: injected activities differ between time points; the first is used")
    cyc = _Cycle(cycle, tps, injected, min(tps, key=lambda d: abs(d["hours"] - ctx.s.dose_map_hours)))
    for tp in tps:
        _measure_time_point(ctx, cyc, tp)
    cyc.voi = _voi_volumes(ctx.tac_rows, cycle, ctx.s)
    return cyc


def _time_point_masks(ctx: _Patient, tp: dict[str, Any]
                      ) -> tuple[dict[str, sitk.Image], dict[str, sitk.Image]]:
    """The measuring and the binary masks of one time point's SPECT grid: binary VOIs (noted, not a fixed
    VOI) where the registration wrote no fractional masks."""
    use = ctx.measure_def
    table = ctx.table
    if use.mask_kind == "fractional" and not ((table.session == tp["session"]) & (
            table.kind == "fractional")).any():
        use = replace(ctx.measure_def, mask_kind="binary")
        ctx.notes.append(f"{tp['session']}: no fractional masks from the registration: binary VOIs of this "
                         "grid (not a fixed VOI)")
        ctx.grid_voi_sessions.append(tp["session"])
    return session_regions(ctx.reg, table, tp["session"], use)


def _measure_time_point(ctx: _Patient, cyc: _Cycle, tp: dict[str, Any]) -> None:
    """Activity of every region (and the field of view) on one time point's SPECT; keeps the dose grid."""
    spect = read_image(str(tp["path"]), sitk.sitkFloat64)
    masks, binary = _time_point_masks(ctx, tp)
    arr = sitk.GetArrayViewFromImage(spect)
    vml = voxel_volume_ml(spect)
    fov_mbq = float(np.nansum(arr)) * vml / 1e6
    measured: dict[str, float] = {_FOV: fov_mbq}
    for region in [*ctx.regions, _FOV]:
        if region == _FOV:
            st = {"integral": fov_mbq * 1e6, "mean": float(np.nanmean(arr)), "volume_ml": arr.size * vml,
                  "fraction_in_fov": 1.0}
        else:
            if region not in masks:
                ctx.notes.append(f"{tp['session']}: no {region} mask on this SPECT grid")
                continue
            try:
                st = region_stats(spect, masks[region])
            except ValueError as exc:  # empty / out of the field of view
                ctx.notes.append(f"{tp['session']} {region}: {exc}")
                continue
        measured[region] = st["integral"] / 1e6
        _add_tac_point(ctx, cyc, tp, region, st)
    if tp is cyc.grid_tp:
        ct = read_image(str(tp["ct"])) if tp["ct"] is not None else None
        cyc.grid = _DoseGrid(spect, binary, measured, _density_on(spect, ct, ctx.s), tp)


def _add_tac_point(ctx: _Patient, cyc: _Cycle, tp: dict[str, Any], region: str, st: dict[str, Any]) -> None:
    """One region at one time point: recovery-corrected activity (lesions, with a recovery curve), the
    physical-bounds check of the measured activity, the tac.tsv row."""
    lam = D.LAMBDA_LU177_PER_H
    s = ctx.s
    a = st["integral"] / 1e6
    rc = math.nan
    if ctx.recovery is not None and region.startswith(("lesion_", "extrahepatic_")):
        rc = ctx.recovery(st["volume_ml"])
        a = a / rc
    cyc.per_region.setdefault(region, []).append((tp["hours"], a, tp["session"]))
    found = check_activity(st["integral"] / 1e6, cyc.injected, tp["hours"], lam, ctx.tol, stage="dosimetry",
                           region=region, where=tp["session"], source=str(tp["path"].relative_to(ctx.ing)))
    ctx.violations.extend(found)
    ctx.tac_rows.append({"cycle": cyc.cycle, "session": tp["session"], "hours_pi": tp["hours"],
                         "region": region,
                         "activity_mbq": a, "activity_sd_mbq": a * s.activity_cv,
                         "activity_measured_mbq": st["integral"] / 1e6, "recovery_coefficient": rc,
                         "concentration_bqml": st["mean"] / (1.0 if math.isnan(rc) else rc),
                         "activity_decay_corrected_mbq": a * math.exp(lam * tp["hours"]),
                         "volume_ml": st["volume_ml"], "fraction_in_fov": st["fraction_in_fov"],
                         "percent_injected": 100.0 * a / cyc.injected, "bounds_flag": flag_text(found)})


def _recovery_uncertainty(ctx: _Patient, region: str, voi: dict[str, dict[str, Any]]) -> tuple[float, float]:
    """Relative RC uncertainty of a region from its VOI volume and from the RC curve's residual (0 without
    partial-volume correction)."""
    if ctx.recovery is None or not region.startswith(("lesion_", "extrahepatic_")):
        return 0.0, 0.0
    v_ml = voi[region]["volume_ml"]
    return (abs(ctx.recovery.log_slope(v_ml)) * D.volume_relative_sd(v_ml, ctx.s.voi_boundary_sd_mm),
            ctx.recovery.residual_sd)


def _integrate_cycle(ctx: _Patient, cyc: _Cycle) -> None:
    """TIA of every region of the cycle (fits.tsv rows, TAC plots); the effective half-lives of its fits
    become the priors of later single-time-point cycles."""
    for region, pts in cyc.per_region.items():
        t = [p[0] for p in pts]
        a = [p[1] for p in pts]
        rc_vol, rc_res = _recovery_uncertainty(ctx, region, cyc.voi)
        info, frows, chosen = _tia_region(t, a, ctx.s, cyc.injected, region, ctx.prior_half_life,
                                          D.combine_relative(rc_vol, rc_res))
        info.update(rc_volume_rel=rc_vol, rc_residual_rel=rc_res)
        if cyc.voi.get(region, {}).get("flag"):
            info["flags"] = "; ".join(x for x in (info["flags"], cyc.voi[region]["flag"]) if x)
        cyc.tia[region] = info
        cyc.chosen_fits[region] = chosen
        for fr in frows:
            ctx.fit_rows.append({"cycle": cyc.cycle, "region": region, **fr})
        if len(t) >= 2:
            ctx.plots.append((f"c{cyc.cycle}_{region}", f"cycle {cyc.cycle} {region}", t, a, chosen))
    for region, info in cyc.tia.items():
        fit = cyc.chosen_fits.get(region)
        if info["n_points"] >= 3 and fit is not None:
            ctx.prior_half_life[region] = (info["effective_half_life_h"], fit.terminal_rate_cv)


def _tia_ratio(region: str, measured: dict[str, float], tia: dict[str, dict[str, Any]]) -> float:
    """TIA / activity on the dose grid of a region (h); NaN when either is missing or not positive."""
    a_t = measured.get(region, math.nan)
    v = tia.get(region, {}).get("tia_mbq_h", math.nan)
    return v / a_t if a_t and math.isfinite(v) and math.isfinite(a_t) and a_t > 0 else math.nan


def _map_regions(grid: _DoseGrid, tia: dict[str, dict[str, Any]]) -> list[tuple[sitk.Image, float]]:
    """(binary mask, TIA / activity) of the regions of the voxel TIA map, in ``_MAP_ORDER`` (first wins)."""
    ordered: list[tuple[sitk.Image, float]] = []
    for key in _MAP_ORDER:
        binary = grid.binary
        names = numbered(binary, key) if key.endswith("_") else (
            [key] if key in binary else [])
        for r in names:
            rr = _tia_ratio(r, grid.measured, tia)
            if math.isfinite(rr):
                ordered.append((grid.binary[r], rr))
    return ordered


def _dose_maps(ctx: _Patient, cyc: _Cycle) -> None:
    """Voxel TIA map of the cycle on its dose grid, local-deposition and kernel dose maps (``ctx.maps``)."""
    lam = D.LAMBDA_LU177_PER_H
    s = ctx.s
    grid = cyc.grid
    assert grid is not None  # the dose grid time point is one of the cycle's: measured
    spect, dens = grid.spect, grid.density
    vml = voxel_volume_ml(spect)
    act_map = sitk.GetArrayFromImage(spect) * vml / 1e6
    act_img = sitk.GetImageFromArray(act_map)
    act_img.CopyInformation(spect)
    ordered = _map_regions(grid, cyc.tia)
    default = _tia_ratio(_FOV, grid.measured, cyc.tia)
    if not math.isfinite(default):
        default = 1.0 / lam
        ctx.notes.append(f"cycle {cyc.cycle}: no field-of-view kinetics, physical decay used outside the "
                         "regions")
    tmap = D.tia_map(act_img, ordered, default)
    cyc.local = D.local_deposition_dose(tmap, dens)
    sp_key = tuple(round(v, 6) for v in spect.GetSpacing())
    if sp_key not in ctx.kernels:
        ctx.kernels[sp_key] = D.lu177_voxel_kernel(spect.GetSpacing(), s.kernel_radius_mm, s.kernel_photons,
                                                   s.electron_mean_range_mm, n_samples=s.kernel_samples)
    cyc.kern = D.kernel_dose(tmap, ctx.kernels[sp_key], dens)
    ctx.maps[cyc.cycle] = {"tia_map_mbq_h": tmap, "dose_local_gy": cyc.local, "dose_kernel_gy": cyc.kern}
    if dens is not None:
        ctx.maps[cyc.cycle]["density_g_ml"] = dens
    ctx.rtdose_meta[cyc.cycle] = grid.tp


def _dose_rows(ctx: _Patient, cyc: _Cycle) -> None:
    """The dosimetry.tsv rows of the cycle: every region with a TIA, then the field of view."""
    for region in [*ctx.regions, _FOV]:
        if region in cyc.tia:
            ctx.dos_rows.append(_dose_row(ctx, cyc, region, cyc.tia[region]))


def _dose_row(ctx: _Patient, cyc: _Cycle, region: str, info: dict[str, Any]) -> dict[str, Any]:
    """One region's dosimetry.tsv row of one cycle: TIA, doses, kidney BED, physical bounds."""
    s = ctx.s
    row = _tia_fields(ctx, cyc, region, info)
    for m in ("local", "kernel", "svalue"):
        row[f"dose_{m}_gy"] = row[f"dose_{m}_sd_gy"] = math.nan
    row["mass_g"] = math.nan
    assert cyc.grid is not None
    if region != _FOV and region in cyc.grid.binary:
        try:
            _voxel_doses(ctx, cyc, region, info, row)
            _svalue_dose(s, region, info, row)
        except ValueError as exc:
            ctx.notes.append(f"cycle {cyc.cycle} {region}: no dose on {cyc.grid.tp['session']}: {exc}")
    if region.startswith("kidney"):
        teff = info["effective_half_life_h"]
        for m in ("local", "kernel", "svalue"):
            row[f"bed_{m}_gy"] = D.bed(row[f"dose_{m}_gy"], teff, s.alpha_beta_gy, s.repair_half_time_h)
    row["bounds_flag"] = _bounds_flag(row, cyc.injected, D.LAMBDA_LU177_PER_H, ctx.tol, f"cycle {cyc.cycle}",
                                      ctx.violations)
    return row


def _tia_fields(ctx: _Patient, cyc: _Cycle, region: str, info: dict[str, Any]) -> dict[str, Any]:
    """The TIA part of a dosimetry.tsv row: method, TIA and its uncertainty components, VOI, alternatives."""
    assert cyc.grid is not None
    voi, injected = cyc.voi, cyc.injected
    v, sd = info["tia_mbq_h"], info["tia_sd_mbq_h"]
    return {"cycle": str(cyc.cycle), "region": region, "session_dose_grid": cyc.grid.tp["session"],
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
            "partial_volume_correction": _pvc_text(region, ctx.recovery, voi),
            "tia_coefficient_h": v / injected,
            "residence_time_h": v / injected,
            "tia_trapezoid_mbq_h": info["tia_trapezoid_mbq_h"],
            "tia_trapezoid_sd_mbq_h": info["tia_trapezoid_sd_mbq_h"],
            "tia_hanscheid_mbq_h": info["tia_hanscheid_mbq_h"],
            "tia_madsen_mbq_h": info["tia_madsen_mbq_h"],
            "effective_half_life_h": info["effective_half_life_h"], "flags": info["flags"]}


def _voxel_doses(ctx: _Patient, cyc: _Cycle, region: str, info: dict[str, Any], row: dict[str, Any]) -> None:
    """Mean local-deposition and kernel dose of a region (± from the TIA's relative uncertainty), its mass
    and DVHs (``ctx.dvh_rows``)."""
    grid = cyc.grid
    assert grid is not None
    v, sd = info["tia_mbq_h"], info["tia_sd_mbq_h"]
    rel = sd / v if v and math.isfinite(v) and math.isfinite(sd) else math.nan
    for m, img in (("local", cyc.local), ("kernel", cyc.kern)):
        rd = D.region_dose(img, grid.binary[region], grid.density)
        row[f"dose_{m}_gy"] = rd["mean_gy"]
        row[f"dose_{m}_sd_gy"] = rd["mean_gy"] * rel
        row["mass_g"] = rd["mass_g"]
        dvh = D.dvh(img, grid.binary[region], ctx.s.dvh_bin_gy)
        dvh.insert(0, "method", m)
        dvh.insert(0, "region", region)
        dvh.insert(0, "cycle", cyc.cycle)
        ctx.dvh_rows.append(dvh)


def _svalue_dose(s: D.DosimetrySettings, region: str, info: dict[str, Any], row: dict[str, Any]) -> None:
    """S-value dose of a region at its measured mass (sphere model for lesions, mass-scaled organ
    S-values)."""
    v = info["tia_mbq_h"]
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


def _cumulative_rows(ctx: _Patient, dos: pd.DataFrame) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The cumulative dosimetry.tsv row of every region (over cycles) and the limit comparisons."""
    limits: list[dict[str, Any]] = []
    cum_rows: list[dict[str, Any]] = []
    if dos.empty:
        return cum_rows, limits
    for region, g in dos.groupby("region", sort=False):
        row = _cumulative_row(region, g)
        row["limit_gy"], row["limit_flags"] = _check_limits(ctx.s, region, row, limits)
        row["bounds_flag"] = _bounds_flag(row, row["injected_mbq"], D.LAMBDA_LU177_PER_H, ctx.tol,
                                          "cumulative", ctx.violations)
        cum_rows.append(row)
    return cum_rows, limits


def _cumulative_row(region: Any, g: pd.DataFrame) -> dict[str, Any]:
    """Sums over a region's cycles: TIA (random parts in quadrature, systematic linearly), doses, kidney
    BED."""
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
    return row


def _check_limits(s: D.DosimetrySettings, region: str, row: dict[str, Any],
                  limits: list[dict[str, Any]]) -> tuple[float, str]:
    """Cumulative kidney dose and BED, bone-marrow dose vs the configured limits, every method (appended to
    ``limits``): the row's ``limit_gy`` (the dose limit; NaN: none) and ``limit_flags`` text."""
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
    return (checks[0][1] if checks else math.nan), "; ".join(flags)


def _summary(ctx: _Patient, limits: list[dict[str, Any]]) -> dict[str, Any]:
    """summary.json: cycles, regions, limits, registration and physical-bounds flags (the ingest's too), VOI,
    partial-volume correction, notes, settings and constants; the bounds violations are logged."""
    ing, s, sessions, recovery = ctx.ing, ctx.s, ctx.sessions, ctx.recovery
    upstream = layout.SESSIONS.read(ing).get("physical_bounds") or [] if layout.SESSIONS.exists(ing) else []
    for v in ctx.violations:
        log.warning("%s", v.message)
    exceeded = [x for x in limits if x["exceeded"]]
    return {"patient": ctx.patient, "cycles": {str(c): {"injected_mbq": sessions[c][0]["injected_mbq"],
                                                        "time_points": [tp["session"] for tp in sorted(
                                                            sessions[c], key=lambda d: d["hours"])],
                                                        "dose_grid_session": ctx.rtdose_meta[c]["session"]}
                                               for c in sorted(sessions)},
            "regions": ctx.regions, "limits": limits, "limits_flagged": bool(exceeded),
            "limits_exceeded": exceeded, "registration_flagged": bool(ctx.qc.get("flagged", False)),
            "physical_bounds": upstream + [v.as_dict() for v in ctx.violations],
            "physical_bounds_flagged": bool(upstream or ctx.violations),
            "voi": {"fixed": ctx.measure_def.mask_kind == "fractional" and not ctx.grid_voi_sessions,
                    "masks": ctx.measure_def.mask_kind, "binary_sessions": ctx.grid_voi_sessions,
                    "volume_tolerance": s.voi_volume_tolerance,
                    "flags": sorted({f"cycle {r['cycle']} {r['region']}: {r['voi_flag']}"
                                     for r in ctx.tac_rows if r.get("voi_flag")})},
            "partial_volume_correction": recovery.describe() if recovery is not None else "none",
            "notes": ctx.notes, "settings": asdict(s), "region_definition": asdict(ctx.region_def),
            "measured_with": asdict(ctx.measure_def),
            "constants": {"electron_kev_per_decay": D.ELECTRON_KEV_PER_DECAY,
                          "local_deposition_mgy_kg_per_mbq_h": D.LOCAL_DEPOSITION_MGY_KG_PER_MBQ_H,
                          "lambda_per_h": D.LAMBDA_LU177_PER_H,
                          "sphere_s_table_gy_per_mbq_h": D.SPHERE_S_TABLE,
                          "organ_s_table_gy_per_mbq_h": D.ORGAN_S_TABLE,
                          "organ_reference_mass_g": D.ORGAN_REFERENCE_MASS_G},
            "prrtquant_version": __version__}


def _write_outputs(ctx: _Patient, out_dir: str | Path, dos_all: pd.DataFrame,
                   summary: dict[str, Any]) -> None:
    """Write every output into ``out_dir`` at once (atomic): tables, dose maps and RTDOSE, plots, summary."""
    s = ctx.s
    with atomic_directory(out_dir) as tmp:
        layout.TAC.write(tmp, ctx.tac_rows)
        layout.FITS.write(tmp, ctx.fit_rows)
        layout.DOSIMETRY.write(tmp, dos_all)
        layout.DVH.write(tmp, pd.concat(ctx.dvh_rows, ignore_index=True) if ctx.dvh_rows else [])
        _write_dose_maps(ctx, tmp)
        if s.plots:
            (tmp / "tac").mkdir()
            for name, title, t, a, fit in ctx.plots:
                D.tac_plot(tmp / "tac" / f"{name}.png", title, t, a, fit,
                           [v * s.activity_cv for v in a])
        layout.DOSIMETRY_SUMMARY.write(tmp, summary)


def _write_dose_maps(ctx: _Patient, tmp: Path) -> None:
    """Per cycle: the TIA, density and dose maps as NIfTI, the dose maps as DICOM RTDOSE (``rtdose``)."""
    for cycle, imgs in ctx.maps.items():
        d = tmp / "dose" / str(cycle)
        d.mkdir(parents=True)
        for name, img in imgs.items():
            sitk.WriteImage(sitk.Cast(img, sitk.sitkFloat32), str(d / f"{name}.nii.gz"), useCompression=True)
        if ctx.s.rtdose:
            tp = ctx.rtdose_meta[cycle]
            for m in ("local", "kernel"):
                write_rtdose(imgs[f"dose_{m}_gy"], d / f"rtdose_{m}.dcm", tp["frame_of_reference_uid"],
                             patient_name=ctx.patient, patient_id=ctx.patient,
                             study_instance_uid=tp["study_instance_uid"],
                             series_description=f"177Lu cycle {cycle} dose ({m})",
                             uid_seed=(ctx.patient, cycle, m, tp["session"]), comment=f"cycle {cycle} {m}")


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
