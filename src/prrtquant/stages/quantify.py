"""The quantification stage on one patient: every endpoint of the five protocols, from the ingest and
registration outputs.

``quantify_patient(ingest_dir, register_dir, out_dir, settings)`` writes atomically into ``out_dir``:

- ``lesions.tsv`` — Bordeaux design: per target lesion its lobe (majority, with the fraction), volume,
  SUVmean/max/peak and Bq/mL mean on the IA and IV PET, ER from means, maxima and peaks, the
  tumour-to-liver ratio on the IV PET and SSTR positivity;
- ``eligibility.json`` — the ER statistic, its value, the threshold, the decision, the lesions used
  (the treated lobe's in the lobar design), the SSTR-positive fraction (ReLUTH rule), QC flags;
- ``organs.tsv`` — organs at risk, healthy liver and extrahepatic lesions: SUVmean IA and IV, ratio;
- ``lobes.tsv`` — lobar design (LUTIA): per SPECT time point and lobe, treated/control, T, N, T/N and the
  treated-over-control ratio, kidney and extrahepatic uptake as % of injected activity; empty (header
  only) with a note in ``quantify.json`` for the whole-liver design;
- ``lobe_lesions.tsv`` — the per-lesion T/N behind each lobe's row;
- ``cycles.tsv`` — per therapy cycle and SPECT time point, every region's mean concentration, activity
  and % of injected activity, with the cycle's route (IA or IV): IA cycles vs IV cycles (MSK design);
- ``quantify.json`` — settings, notes (missing sessions, lesions outside a field of view, straddling
  lesions, non-positive backgrounds), the liver-only disease check (NELMAS) and the retreatment rule.

Missing sessions or regions never stop the stage: the endpoints that need them are left empty (NaN in
tables, null in JSON) and a note says why; everything else is computed.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import pandas as pd
import SimpleITK as sitk

from .. import __version__
from ..bounds import BoundsSettings, Violation, check_activity, flag_text, raise_if_any
from ..roi_names import numbered
from ..io import atomic_directory, read_image
from ..plausibility import PlausibilitySettings, flag_range
from ..quantify import (
    EmptyRegionError,
    QuantifyError,
    assign_lobe,
    eligibility,
    enhancement_ratios,
    lobe_tn,
    region_stats,
    retreatment_fraction,
    sstr_positive,
    suv_peak,
    tumour_to_liver,
)
from . import layout
from .regions import RegionSettings, session_regions

log = logging.getLogger(__name__)

ORGANS = ("kidney_left", "kidney_right", "spleen", "bone_marrow")
LOBES = ("left", "right")
ER_STATS = ("er_mean", "er_max", "er_peak")
#: lobe rows are built with these keys and written with the layout's names
_LOBE_RENAME = {"t_bqml": "t_bqml_per_ml", "n_bqml": "n_bqml_per_ml"}


@dataclass(frozen=True)
class QuantifySettings:
    """The config's ``quantify`` section (defaults = the trials' rules)."""

    statistic: str = "er_max"          #: per-lesion ratio averaged for eligibility
    threshold: float = 3.0             #: mean ER at or above which the patient is eligible
    max_lesions: int = 5               #: target lesions used (reader's order)
    mask_kind: str = "binary"          #: binary | fractional propagated masks for means
    liver_margin_mm: float = 0.0       #: healthy liver = liver minus lesions dilated by this
    tn_hours: float = 24.0             #: nominal SPECT time point of the lobar T/N endpoint
    sstr_threshold: float = 1.0        #: SSTR-positive when lesion/healthy-liver SUVmean >= this
    retreatment_required: float = 0.9  #: ReLUTH: share of SSTR-positive lesions required
    straddle_fraction: float = 0.9     #: a lesion with less of itself in its lobe is reported as straddling

    def __post_init__(self) -> None:
        if self.statistic not in ER_STATS:
            raise ValueError(f"quantify.statistic must be one of {list(ER_STATS)}, got {self.statistic!r}")
        if self.mask_kind not in ("binary", "fractional"):
            raise ValueError(f"quantify.mask_kind must be binary or fractional, got {self.mask_kind!r}")
        if self.max_lesions < 1:
            raise ValueError(f"quantify.max_lesions must be >= 1, got {self.max_lesions}")
        if not (self.liver_margin_mm >= 0):
            raise ValueError(f"quantify.liver_margin_mm must be >= 0, got {self.liver_margin_mm}")

    @property
    def regions(self) -> RegionSettings:
        """The region definition (mask kind, healthy-liver margin) shared with dosimetry."""
        return RegionSettings(mask_kind=self.mask_kind, liver_margin_mm=self.liver_margin_mm)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> "QuantifySettings":
        """The settings of the config's ``quantify`` section (an unknown key is an error)."""
        cfg = dict(cfg or {})
        unknown = set(cfg) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"quantify: unknown setting(s) {sorted(unknown)}")
        return cls(**cfg)


# ----------------------------------------------------------------------------------------- inputs

class _Patient:
    """The ingest and registration outputs of one patient, read lazily."""

    def __init__(self, ingest_dir: Path, register_dir: Path, mask_kind: str) -> None:
        self.ing, self.reg, self.mask_kind = ingest_dir, register_dir, mask_kind
        self.inv = layout.INVENTORY.read(ingest_dir)
        self.sessions = layout.SESSIONS.read(ingest_dir)
        self.qc = layout.REGISTRATION_QC.read(register_dir)
        self.mask_table = layout.MASKS.read(register_dir)
        ref, source = self.qc["reference_session"], self.qc["mask_source"]
        rows = self.inv[(self.inv.session == ref) & (self.inv.role == "mask") & (self.inv.mask_source == source)]
        self.ref_masks = {r.roi: read_image(str(ingest_dir / r.path)) for r in rows.itertuples()}
        self.lesions = numbered(self.ref_masks, "lesion_")
        self.extra = numbered(self.ref_masks, "extrahepatic_")

    def image(self, session: str, role: str) -> tuple[sitk.Image, dict[str, Any]] | None:
        rows = self.inv[(self.inv.session == session) & (self.inv.role == role)]
        if rows.empty:
            return None
        path = self.ing / rows.iloc[0].path
        side = layout.read_sidecar(path)
        return read_image(str(path), sitk.sitkFloat64), side

    def spect_sessions(self) -> list[tuple[str, dict[str, Any]]]:
        out = [(s, d) for s, d in self.sessions.get("sessions", {}).items() if s.startswith("spect_")]
        return sorted(out, key=lambda kv: (int(kv[1].get("cycle") or 0), float(kv[1].get("hours_pi") or 0.0)))


def _session_masks(pt: _Patient, session: str, s: "QuantifySettings") -> tuple[dict[str, sitk.Image],
                                                                            dict[str, sitk.Image]]:
    """(masks used for means, binary masks) of one emission session, healthy liver included
    (:func:`prrtquant.stages.regions.session_regions`, the definition dosimetry uses too)."""
    return session_regions(pt.reg, pt.mask_table, session, s.regions, pt.lesions)


def _stats(image: sitk.Image, mask: sitk.Image) -> dict[str, float] | None:
    """Region statistics, or None when the mask has no voxel in this image's field of view."""
    try:
        return region_stats(image, mask)
    except EmptyRegionError:
        return None


# ----------------------------------------------------------------------------------------- PET

def _pet_part(pt: _Patient, s: QuantifySettings, notes: list[str]) -> dict[str, dict[str, dict[str, float]]]:
    stats: dict[str, dict[str, dict[str, float]]] = {}
    for route, session in (("ia", "pet_ia"), ("iv", "pet_iv")):
        pet = pt.image(session, "pet")
        if pet is None:
            notes.append(f"{session}: no such session; the endpoints that need it are reported missing")
            continue
        bq, side = pet
        suv = bq * float(side["suv_bw_factor"])
        means, binary = _session_masks(pt, session, s)
        per: dict[str, dict[str, float]] = {}
        for roi in [*pt.lesions, *pt.extra, *ORGANS, "healthy_liver"]:
            if roi not in means:
                continue
            st, sb = _stats(suv, means[roi]), _stats(bq, means[roi])
            if st is None:
                notes.append(f"{session} {roi}: outside the field of view (empty mask on this grid)")
                continue
            try:
                peak, _ = suv_peak(suv, binary[roi])
            except EmptyRegionError:  # partial-volume weights but no voxel centre inside
                notes.append(f"{session} {roi}: no binary voxel in the field of view: SUVpeak missing")
                peak = math.nan
            per[roi] = {"suvmean": st["mean"], "suvmax": st["max"], "suvpeak": peak,
                        "bqml_mean": sb["mean"] if sb else math.nan}
        stats[route] = per
    return stats


def _lesion_lobes(pt: _Patient, s: QuantifySettings, notes: list[str]) -> dict[str, tuple[str, float]]:
    out: dict[str, tuple[str, float]] = {}
    if not {"liver_left", "liver_right"} <= set(pt.ref_masks):
        notes.append("no liver_left/liver_right masks: lesions have no lobe, lobe endpoints missing")
        return out
    for les in pt.lesions:
        try:
            lobe, frac = assign_lobe(pt.ref_masks[les], pt.ref_masks["liver_left"], pt.ref_masks["liver_right"])
        except ValueError as exc:
            notes.append(f"{les}: no lobe ({exc})")
            continue
        out[les] = (lobe, frac)
        if frac < s.straddle_fraction:
            notes.append(f"{les} straddles the lobe boundary: assigned to the {lobe} lobe by majority "
                         f"({100 * frac:.0f}% of its volume)")
    return out


def _lesion_table(pt: _Patient, stats: Mapping[str, Mapping[str, Mapping[str, float]]],
                  lobes: Mapping[str, tuple[str, float]], er: pd.DataFrame,
                  s: QuantifySettings) -> pd.DataFrame:
    ia, iv = stats.get("ia", {}), stats.get("iv", {})
    rows = []
    for les in pt.lesions:
        lobe, frac = lobes.get(les, ("", math.nan))
        vol = region_stats(pt.ref_masks[les], pt.ref_masks[les])["volume_ml"]
        row: dict[str, Any] = {"lesion": les, "lobe": lobe, "lobe_fraction": frac, "volume_ml": vol}
        for route, d in (("ia", ia), ("iv", iv)):
            for k in ("suvmean", "suvmax", "suvpeak", "bqml_mean"):
                row[f"{k}_{route}"] = d.get(les, {}).get(k, math.nan)
        for k in ER_STATS:
            row[k] = float(er.loc[les, k]) if les in er.index else math.nan
        if les in iv and "healthy_liver" in iv and iv["healthy_liver"]["suvmean"] > 0:
            tlr = tumour_to_liver(iv[les]["suvmean"], iv["healthy_liver"]["suvmean"])
            row["tlr_iv"], row["sstr_positive"] = tlr, sstr_positive(tlr, s.sstr_threshold)
        else:
            row["tlr_iv"], row["sstr_positive"] = math.nan, None
        rows.append(row)
    return layout.LESIONS.frame(rows)


def _organ_table(pt: _Patient, stats: Mapping[str, Mapping[str, Mapping[str, float]]]) -> pd.DataFrame:
    ia, iv = stats.get("ia", {}), stats.get("iv", {})
    rows = []
    for roi in [*ORGANS, "healthy_liver", *pt.extra]:
        a, b = ia.get(roi, {}).get("suvmean", math.nan), iv.get(roi, {}).get("suvmean", math.nan)
        rows.append({"region": roi, "suvmean_ia": a, "suvmean_iv": b,
                     "suvmax_ia": ia.get(roi, {}).get("suvmax", math.nan),
                     "suvmax_iv": iv.get(roi, {}).get("suvmax", math.nan),
                     "ratio_ia_iv": a / b if (b and math.isfinite(b) and b > 0) else math.nan})
    return layout.ORGANS.frame(rows)


# ----------------------------------------------------------------------------------------- SPECT



@dataclass
class _SpectPoint:
    """One SPECT time point being quantified: its timing, injected activity and, once measured, the
    statistics of every region in its field of view (``per``, with ``activity_mbq``)."""

    session: str
    cycle: int
    route: str
    hours: float                     #: hours after injection
    nominal: float                   #: nominal time point (hours)
    a0: float                        #: injected activity (Bq)
    lam: float                       #: decay constant (1/h)
    per: dict[str, dict[str, float]] = field(default_factory=dict)


def _spect_regions(pt: _Patient) -> list[str]:
    """Every region measured on a SPECT, in the order of ``cycles.tsv``."""
    return [*pt.lesions, *pt.extra, *ORGANS, "liver", "liver_left", "liver_right", "healthy_liver",
            "healthy_liver_left", "healthy_liver_right"]


def _spect_inputs(pt: _Patient, s: QuantifySettings, session: str, notes: list[str]
                  ) -> tuple[sitk.Image, dict[str, Any], dict[str, sitk.Image]] | None:
    """(concentration image, sidecar, masks used for means) of one SPECT session, or None (with a note) when
    the image or its propagated masks are missing."""
    img = pt.image(session, "spect")
    if img is None:
        notes.append(f"{session}: listed but no SPECT image in the ingest output")
        return None
    conc, side = img
    if session not in set(pt.mask_table.session):
        notes.append(f"{session}: no propagated masks (registration failed or skipped): not quantified")
        return None
    means, _ = _session_masks(pt, session, s)
    return conc, side, means


def _spect_point(session: str, info: Mapping[str, Any], side: Mapping[str, Any]) -> _SpectPoint:
    """The timing and injected activity of one SPECT session (patient sheet first, then the image sidecar)."""
    hours = float(info.get("hours_pi") or side.get("hours_pi") or math.nan)
    return _SpectPoint(
        session=session, cycle=int(info.get("cycle") or 0), route=str(info.get("route") or ""), hours=hours,
        nominal=float(info.get("nominal_hours_pi") or round(hours)),
        a0=float(side.get("injected_activity_bq") or math.nan),
        lam=math.log(2.0) / float(side["half_life_s"]) * 3600.0 if side.get("half_life_s") else math.nan)


def _region_uptake(pt: _Patient, point: _SpectPoint, conc: sitk.Image, side: Mapping[str, Any],
                   means: Mapping[str, sitk.Image], notes: list[str], bounds: BoundsSettings,
                   violations: list[Violation]) -> list[dict[str, Any]]:
    """Measure every region of one SPECT time point into ``point.per``; its ``cycles.tsv`` rows, each
    activity checked against the injected activity (violations appended to ``violations``)."""
    rows: list[dict[str, Any]] = []
    a0, hours, lam = point.a0, point.hours, point.lam
    for roi in _spect_regions(pt):
        if roi not in means:
            continue
        st = _stats(conc, means[roi])
        if st is None:
            notes.append(f"{point.session} {roi}: outside the field of view (empty mask on this grid)")
            continue
        activity_mbq = st["integral"] / 1e6
        pct = 100.0 * activity_mbq * 1e6 / a0 if a0 > 0 else math.nan
        point.per[roi] = {**st, "activity_mbq": activity_mbq}
        found = check_activity(activity_mbq, a0 / 1e6, hours, lam, bounds.activity_tolerance, stage="quantify",
                               region=roi, where=point.session,
                               source=f"series {side.get('source_series_instance_uid', '?')}")
        violations.extend(found)
        rows.append({"cycle": point.cycle, "route": point.route, "session": point.session, "hours_pi": hours,
                     "nominal_hours_pi": point.nominal, "region": roi, "bqml_mean": st["mean"],
                     "bqml_max": st["max"], "volume_ml": st["volume_ml"], "activity_mbq": activity_mbq,
                     "pct_ia": pct, "pct_ia_decay_corrected": pct * math.exp(lam * hours),
                     "injected_activity_mbq": a0 / 1e6, "bounds_flag": flag_text(found)})
    return rows


def _extra_lobar_uptake(pt: _Patient, point: _SpectPoint) -> tuple[float, float]:
    """(kidneys, extrahepatic lesions) as % of the injected activity at one time point."""
    per, a0 = point.per, point.a0
    kid = [per[k]["activity_mbq"] for k in ("kidney_left", "kidney_right") if k in per]
    ext = [per[e]["activity_mbq"] for e in pt.extra if e in per]
    kidneys_pct = 100.0 * sum(kid) * 1e6 / a0 if kid and a0 > 0 else math.nan
    extra_pct = 100.0 * sum(ext) * 1e6 / a0 if ext and a0 > 0 else (0.0 if not pt.extra else math.nan)
    return kidneys_pct, extra_pct


def _lobe_backgrounds(point: _SpectPoint, notes: list[str]) -> tuple[dict[str, float], list[str]]:
    """(positive healthy-liver mean per lobe, lobes whose background is zero or negative: noted, left out)."""
    healthy = {lobe: point.per[f"healthy_liver_{lobe}"]["mean"] for lobe in LOBES
               if f"healthy_liver_{lobe}" in point.per}
    bad = [lobe for lobe, n in healthy.items() if not (math.isfinite(n) and n > 0)]
    for lobe in bad:
        notes.append(f"{point.session}: healthy liver of the {lobe} lobe has mean {healthy[lobe]:.4g} Bq/mL "
                     "(zero or negative background): its T/N is undefined")
        del healthy[lobe]
    return healthy, bad


def _lobe_point(pt: _Patient, s: QuantifySettings, point: _SpectPoint, lobes: Mapping[str, tuple[str, float]],
                treated: str | None, notes: list[str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Lobar design at one time point: (``lobes.tsv`` rows, ``lobe_lesions.tsv`` rows); none (with a note)
    when the lobe T/N cannot be computed."""
    per, session = point.per, point.session
    kidneys_pct, extra_pct = _extra_lobar_uptake(pt, point)
    healthy, bad = _lobe_backgrounds(point, notes)
    targets = [l for l in pt.lesions if l in lobes][: s.max_lesions]
    usable = {l: lobes[l][0] for l in targets if l in per and lobes[l][0] in healthy}
    lost = [l for l in targets if l not in per]
    if lost:
        notes.append(f"{session}: lesions {lost} outside the field of view, left out of T")
    try:
        res = lobe_tn({l: per[l]["mean"] for l in usable}, {l: per[l]["n_voxels"] for l in usable}, usable,
                      healthy, treated if treated in healthy else None)
    except QuantifyError as exc:
        notes.append(f"{session}: lobe T/N not computed ({exc})")
        return [], []
    for n in res["notes"]:
        notes.append(f"{session}: {n}")
    lobe_rows: list[dict[str, Any]] = []
    lesion_rows: list[dict[str, Any]] = []
    for lobe in LOBES:
        entry = res["lobes"].get(lobe)
        role = ("treated" if lobe == treated else "control") if treated else ""
        lobe_rows.append({
            "cycle": point.cycle, "session": session, "hours_pi": point.hours,
            "endpoint": bool(abs(point.nominal - s.tn_hours) < 1e-6), "route": point.route, "lobe": lobe,
            "role": role, "lesions": ",".join(entry["lesions"]) if entry else "",
            "t_bqml": entry["t"] if entry else math.nan, "n_bqml": entry["n"] if entry else math.nan,
            "tn": entry["tn"] if entry else math.nan, "tn_treated_over_control": res["treated_over_control"],
            "n_voxels_t": entry["t_voxels"] if entry else 0.0,
            "n_voxels_n": per.get(f"healthy_liver_{lobe}", {}).get("n_voxels", math.nan),
            "kidneys_pct_ia": kidneys_pct, "extrahepatic_pct_ia": extra_pct,
            "note": (entry or {}).get("note") or ("" if entry else (
                "healthy-liver background not positive: T/N undefined" if lobe in bad
                else f"no healthy_liver_{lobe} on this grid"))})
        for les, tn in (entry["tn_per_lesion"] if entry else {}).items():
            lesion_rows.append({"cycle": point.cycle, "session": session, "hours_pi": point.hours, "lobe": lobe,
                                "role": role, "lesion": les, "bqml_mean": per[les]["mean"], "tn": tn})
    return lobe_rows, lesion_rows


def _spect_part(pt: _Patient, s: QuantifySettings, lobes: Mapping[str, tuple[str, float]], design: str,
                treated: str | None, notes: list[str], bounds: BoundsSettings, violations: list[Violation]
                ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(``cycles.tsv``, ``lobes.tsv``, ``lobe_lesions.tsv``) of every SPECT time point: per session its inputs,
    every region's uptake, and in the lobar design the lobe T/N."""
    cycle_rows: list[dict[str, Any]] = []
    lobe_rows: list[dict[str, Any]] = []
    lesion_rows: list[dict[str, Any]] = []
    spects = pt.spect_sessions()
    if not spects:
        notes.append("no SPECT session: lobes.tsv and cycles.tsv are empty")
    for session, info in spects:
        inputs = _spect_inputs(pt, s, session, notes)
        if inputs is None:
            continue
        conc, side, means = inputs
        point = _spect_point(session, info, side)
        cycle_rows += _region_uptake(pt, point, conc, side, means, notes, bounds, violations)
        if design == "lobar_ia":
            lobe_part, lesion_part = _lobe_point(pt, s, point, lobes, treated, notes)
            lobe_rows += lobe_part
            lesion_rows += lesion_part
    cycles = layout.CYCLES.frame(cycle_rows)
    back = {v: k for k, v in _LOBE_RENAME.items()}
    lobe_table = pd.DataFrame(lobe_rows, columns=[back.get(c, c) for c in layout.LOBES.columns]).rename(
        columns=_LOBE_RENAME)
    lesion_table = layout.LOBE_LESIONS.frame(lesion_rows)
    return cycles, lobe_table, lesion_table


# ----------------------------------------------------------------------------------------- stage

def _design(pt: _Patient, notes: list[str]) -> tuple[str, str | None]:
    """(design, treated lobe or None) from the patient sheet; a lobar design without a treated lobe is noted."""
    design = str(pt.sessions.get("design") or "")
    treated = str(pt.sessions.get("treated_lobe") or "") or None
    if design == "lobar_ia" and treated not in LOBES:
        notes.append("lobar design without a treated lobe in the patient sheet: no treated/control comparison")
        treated = None
    return design, treated


def _target_lesions(pt: _Patient, design: str, treated: str | None,
                    lobes: Mapping[str, tuple[str, float]]) -> list[str]:
    """Target lesions: the reader's order; in the lobar design only the treated lobe's (IA reaches those)."""
    return [l for l in pt.lesions if not (design == "lobar_ia" and treated)
            or lobes.get(l, ("", 0.0))[0] == treated]


def _qc_flags(pt: _Patient, stats: Mapping[str, Mapping[str, Mapping[str, float]]], ingest_dir: Path,
              rules: PlausibilitySettings) -> tuple[list[str], list[dict[str, Any]]]:
    """(QC flags of the eligibility, plausibility flags): failed registrations, ingest's implausible header
    values, and a healthy-liver SUV outside its range (logged)."""
    flags = [f"registration:{x}" for x in pt.qc.get("failed_sessions", [])]
    plausibility = list(pt.sessions.get("plausibility") or [])  # ingest's flagged header values
    for key, sid in (("iv", "pet_iv"), ("ia", "pet_ia")):  # a wrong scale shows in the healthy liver first
        v = stats.get(key, {}).get("healthy_liver", {}).get("suvmean")
        if v is not None and math.isfinite(v):
            for f in flag_range(v, rules.liver_suv, "healthy_liver_suvmean", "g/mL", sid,
                                f"{ingest_dir / sid / 'pet.nii.gz'}: healthy liver SUVbw mean", stage="quantify"):
                log.warning("%s", f.message)
                plausibility.append(f.as_dict())
    flags += [f"plausibility:{f.get('where')}:{f.get('quantity')}" for f in plausibility
              if str(f.get("where", "")).startswith("pet")]  # the PETs the enhancement ratio comes from
    return flags, plausibility


def _eligibility(pt: _Patient, s: QuantifySettings, stats: Mapping[str, Mapping[str, Mapping[str, float]]],
                 er: pd.DataFrame, lesion_table: pd.DataFrame, flags: list[str], targets: list[str],
                 design: str, treated: str | None) -> dict[str, Any]:
    """The content of ``eligibility.json`` (without its notes): the decision, or none when a PET is missing."""
    if stats.get("ia", {}) and stats.get("iv", {}):
        elig = eligibility(er, statistic=s.statistic, threshold=s.threshold, max_lesions=s.max_lesions,
                           qc_flags=flags, lesions=[l for l in targets if l in er.index])
    else:
        elig = {"statistic": s.statistic, "value": None, "threshold": s.threshold, "eligible": None,
                "n_lesions": 0, "lesions": [], "excluded_lesions": [], "qc_flags": flags + ["pet_session_missing"],
                "flagged": True}
    positive = [bool(v) for v in lesion_table.sstr_positive if v is not None and v == v]
    elig.update({"sstr_positive_fraction": (sum(positive) / len(positive)) if positive else None,
                 "design": design, "treated_lobe": treated, "mask_kind": s.mask_kind,
                 "registration_flagged": bool(pt.qc.get("flagged")),
                 "prrtquant_version": __version__})
    return elig


def _retreatment(lesion_table: pd.DataFrame, s: QuantifySettings) -> dict[str, Any] | None:
    """The ReLUTH retreatment rule on the lesions' tumour-to-liver ratios (None without any)."""
    tlr = {r.lesion: r.tlr_iv for r in lesion_table.itertuples() if math.isfinite(r.tlr_iv)}
    return retreatment_fraction(tlr, s.sstr_threshold, s.retreatment_required) if tlr else None


def _liver_only_check(pt: _Patient, iv: Mapping[str, Mapping[str, float]], s: QuantifySettings) -> dict[str, Any]:
    """Liver-only disease check (NELMAS): extrahepatic uptake on the IV PET relative to healthy liver."""
    liver_iv = iv.get("healthy_liver", {}).get("suvmean", math.nan)
    extra_check = {e: {"suvmean_iv": iv.get(e, {}).get("suvmean", math.nan),
                       "suvmax_iv": iv.get(e, {}).get("suvmax", math.nan),
                       "ratio_to_healthy_liver_iv": (iv[e]["suvmean"] / liver_iv
                                                     if e in iv and liver_iv > 0 else math.nan)}
                   for e in pt.extra}
    return {"extrahepatic_regions": extra_check,
            "extrahepatic_sstr_positive": sorted(e for e, v in extra_check.items()
                                                 if math.isfinite(v["ratio_to_healthy_liver_iv"])
                                                 and v["ratio_to_healthy_liver_iv"] >= s.sstr_threshold)}


def quantify_patient(ingest_dir: str | Path, register_dir: str | Path, out_dir: str | Path,
                     settings: QuantifySettings | None = None, bounds: BoundsSettings | None = None,
                     fail_on_bounds: bool = False, plausibility_rules: PlausibilitySettings | None = None) -> dict[str, Any]:
    """Compute every endpoint of one patient; return the content of ``eligibility.json``.

    ``bounds``: physical plausibility (:mod:`prrtquant.bounds`) of every SPECT activity; a violation is
    written into ``cycles.tsv`` (``bounds_flag``) and ``quantify.json`` (``physical_bounds``, with the
    ingest's), or, with ``fail_on_bounds``, raises :class:`prrtquant.bounds.PhysicalBoundsError` and
    nothing is written.
    """
    s = settings or QuantifySettings()
    bounds = bounds or BoundsSettings()
    violations: list[Violation] = []
    notes: list[str] = []
    pt = _Patient(Path(ingest_dir), Path(register_dir), s.mask_kind)
    design, treated = _design(pt, notes)
    # PET: lesions' lobes, uptake, enhancement ratios, eligibility
    lobes = _lesion_lobes(pt, s, notes)
    stats = _pet_part(pt, s, notes)
    ia, iv = stats.get("ia", {}), stats.get("iv", {})
    er = enhancement_ratios({l: ia[l] for l in pt.lesions if l in ia}, {l: iv[l] for l in pt.lesions if l in iv})
    lesion_table = _lesion_table(pt, stats, lobes, er, s)
    flags, plausibility = _qc_flags(pt, stats, Path(ingest_dir), plausibility_rules or PlausibilitySettings())
    elig = _eligibility(pt, s, stats, er, lesion_table, flags, _target_lesions(pt, design, treated, lobes),
                        design, treated)
    retreat = _retreatment(lesion_table, s)
    liver_only = _liver_only_check(pt, iv, s)
    # SPECT: every region's uptake per time point, lobe T/N
    cycles, lobe_table, lobe_lesions = _spect_part(pt, s, lobes, design, treated, notes, bounds, violations)
    if fail_on_bounds:
        raise_if_any(violations, f"{register_dir}")
    upstream = list(pt.sessions.get("physical_bounds") or [])
    for v in violations:
        log.warning("%s", v.message)
    if design != "lobar_ia":
        notes.append(f"design {design or 'unknown'}: no treated/control lobes, lobes.tsv is empty")
    summary = {"patient": pt.sessions.get("patient"), "design": design, "treated_lobe": treated,
               "settings": asdict(s), "eligibility": elig, "retreatment": retreat,
               "liver_only_check": liver_only,
               "physical_bounds": upstream + [v.as_dict() for v in violations],
               "physical_bounds_flagged": bool(upstream or violations),
               "plausibility": plausibility,
               "notes": notes, "prrtquant_version": __version__}
    elig["notes"] = notes
    for n in notes:
        log.warning("%s", n)
    with atomic_directory(out_dir) as tmp:
        layout.LESIONS.write(tmp, lesion_table)
        layout.ORGANS.write(tmp, _organ_table(pt, stats))
        layout.ELIGIBILITY.write(tmp, elig)
        layout.LOBES.write(tmp, lobe_table)
        layout.LOBE_LESIONS.write(tmp, lobe_lesions)
        layout.CYCLES.write(tmp, cycles)
        layout.QUANTIFY_SUMMARY.write(tmp, summary)
    return elig
