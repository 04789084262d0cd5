"""The per-patient page: one self-contained HTML a physicist can read and sign off.

It puts on one page what the stage tables hold for one patient: the IA decision with its value and its
definition in words, the lesion table, the lobar T/N per SPECT time point, the TIA / dose / BED per region,
cycle and cumulative against the configured limits, every registration's QC, and every flag (physical bounds,
implausible header values, limits, registration). Numbers are rounded for reading (4 significant digits, counts as integers);
the TSVs beside keep full precision. Every table is a plain HTML ``<table>`` (units in the headers).

>>> fmt(3.944147316782288), fmt(3.0), fmt(54426.9), fmt(0.000123456), fmt(float("nan")), fmt(12), fmt(True)
('3.944', '3.000', '54430', '0.0001235', '', '12', 'yes')
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from .. import __version__
from ..io import atomic_path, read_failure
from . import layout

__all__ = ["fmt", "patient_page", "write_patient_page", "DECISION_WORDS", "LIMIT_SOURCES"]

#: The decision statistics in words (quantify.statistic).
DECISION_WORDS = {
    "er_max": "mean over the target lesions of the enhancement ratio SUVmax(IA PET) / SUVmax(IV PET)",
    "er_mean": "mean over the target lesions of the enhancement ratio SUVmean(IA PET) / SUVmean(IV PET)",
    "er_peak": "mean over the target lesions of the enhancement ratio SUVpeak(IA PET) / SUVpeak(IV PET)",
}
#: Where the default cumulative limits come from (they are configuration values, flagged, never decided).
LIMIT_SOURCES = ("kidney 23 Gy: external-beam tolerance dose TD5/5 (Emami et al., Int J Radiat Oncol Biol Phys "
                 "21 (1991) 109); kidney BED 40 Gy: Bodei et al., EJNMMI 35 (2008) 1847 (no risk factors); "
                 "bone marrow 2 Gy: Benua et al., Am J Roentgenol 87 (1962) 171; each set by "
                 "dosimetry.kidney_limit_gy, kidney_bed_limit_gy, bone_marrow_limit_gy")

_CSS = ("body{font-family:sans-serif;font-size:13px;margin:1.5em;max-width:80em}"
        "table{border-collapse:collapse;margin:0.4em 0 1.2em 0}td,th{border:1px solid #bbb;padding:2px 6px}"
        "th{background:#eee;text-align:left}td.n{text-align:right;font-variant-numeric:tabular-nums}"
        ".flag{color:#a00;font-weight:bold}.ok{color:#070;font-weight:bold}h2{margin-top:1.4em}")


def fmt(v: Any, digits: int = 4) -> str:
    """A value as people read it: a number to ``digits`` significant digits in plain notation (trailing
    zeros kept: they are significant), integers as integers, NaN and None empty, booleans as yes / no."""
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            return ""
        v = float(f"{v:.{digits}g}")  # rounded first: 999.96 is 1000, not 1000.0
        if v == 0.0:
            return "0"
        decimals = digits - 1 - math.floor(math.log10(abs(v)))
        if abs(v) >= 1e7 or decimals > 9:
            return f"{v:.{digits - 1}e}"
        return f"{v:.{decimals}f}" if decimals > 0 else str(int(round(v, decimals)))
    return str(v)


#: Columns that count things: written as integers even when a table holds them as floats (empty cells).
_INTEGER_COLUMNS = {"cycle", "n_points", "n_cycles", "n_voxels_t", "n_voxels_n"}


def _table(df: pd.DataFrame, columns: Sequence[tuple[str, str]], table_id: str, empty: str) -> str:
    """``columns``: (column, header with unit); a missing column is left out."""
    cols = [(c, h) for c, h in columns if c in df.columns]
    if df.empty or not cols:
        return f"<p id='{table_id}'>{html.escape(empty)}</p>"
    head = "".join(f"<th>{html.escape(h)}</th>" for _, h in cols)
    rows = []
    for rec in df.to_dict(orient="records"):
        cells = []
        for c, _ in cols:
            v = rec[c]
            if c in _INTEGER_COLUMNS and isinstance(v, float) and math.isfinite(v) and v.is_integer():
                v = int(v)
            num = isinstance(v, (int, float)) and not isinstance(v, bool)
            cells.append(f"<td class='n'>{fmt(v)}</td>" if num else f"<td>{html.escape(fmt(v))}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table id='{table_id}'><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _decision(elig: dict[str, Any]) -> str:
    stat = str(elig.get("statistic"))
    value, threshold, eligible = elig.get("value"), elig.get("threshold"), elig.get("eligible")
    verdict = ("<span class='ok'>eligible for an IA cycle</span>" if eligible else
               "<span class='flag'>not eligible</span>" if eligible is False else "<span class='flag'>no decision</span>")
    flags = list(elig.get("qc_flags") or [])
    rows = [("decision", verdict), ("decision value", html.escape(fmt(value))),
            ("threshold", html.escape(f"≥ {fmt(threshold)}")),
            ("definition", html.escape(f"{stat}: {DECISION_WORDS.get(stat, stat)}")),
            ("lesions used", html.escape(", ".join(elig.get("lesions") or []) or "none")),
            ("lesions left out", html.escape(", ".join(elig.get("excluded_lesions") or []) or "none")),
            ("SSTR-positive fraction", html.escape(fmt(elig.get("sstr_positive_fraction")))),
            ("flags", "<span class='flag'>" + html.escape("; ".join(flags)) + "</span>" if flags or elig.get("flagged")
             else "none")]
    body = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
    return f"<table id='decision'>{body}</table>"


_LESION_COLUMNS = (("lesion", "lesion"), ("lobe", "lobe"), ("volume_ml", "volume (mL)"),
                   ("suvmax_ia", "SUVmax IA"), ("suvmax_iv", "SUVmax IV"), ("suvmean_ia", "SUVmean IA"),
                   ("suvmean_iv", "SUVmean IV"), ("suvpeak_ia", "SUVpeak IA"), ("suvpeak_iv", "SUVpeak IV"),
                   ("er_max", "ER (SUVmax)"), ("er_mean", "ER (SUVmean)"), ("er_peak", "ER (SUVpeak)"),
                   ("tlr_iv", "tumour/liver (IV)"), ("sstr_positive", "SSTR positive"))
_LOBE_COLUMNS = (("cycle", "cycle"), ("session", "session"), ("hours_pi", "hours after injection (h)"),
                 ("endpoint", "endpoint (24 h)"), ("lobe", "lobe"), ("role", "role"), ("lesions", "lesions"),
                 ("t_bqml_per_ml", "T (Bq/mL)"), ("n_bqml_per_ml", "N (Bq/mL)"), ("tn", "T/N"),
                 ("tn_treated_over_control", "T/N treated / control"), ("kidneys_pct_ia", "kidneys (%IA)"),
                 ("extrahepatic_pct_ia", "extrahepatic (%IA)"), ("note", "note"))
_DOSE_COLUMNS = (("cycle", "cycle"), ("region", "region"), ("method", "TIA method"), ("n_points", "time points"),
                 ("tia_mbq_h", "TIA (MBq·h)"), ("tia_sd_mbq_h", "± (MBq·h)"),
                 ("effective_half_life_h", "T_eff (h)"), ("dose_local_gy", "dose, local (Gy)"),
                 ("dose_local_sd_gy", "± (Gy)"), ("dose_kernel_gy", "dose, kernel (Gy)"),
                 ("dose_kernel_sd_gy", "± (Gy)"), ("dose_svalue_gy", "dose, S-value (Gy)"),
                 ("dose_svalue_sd_gy", "± (Gy)"), ("bed_kernel_gy", "BED, kernel (Gy)"), ("limit_gy", "limit (Gy)"),
                 ("limit_flags", "limit flags"), ("bounds_flag", "physical bound"))
_QC_COLUMNS = (("session", "session"), ("kind", "registration"), ("metric", "Mattes MI"),
               ("inverse_consistency_mm", "inverse consistency (mm)"), ("body_dice", "body Dice"),
               ("passed", "passed"), ("reasons", "reasons"))


def _qc_frame(qc: dict[str, Any]) -> pd.DataFrame:
    rows = []
    for session, q in (qc.get("sessions") or {}).items():
        rows.append({"session": session, "kind": q.get("kind") or "CT to reference", "metric": q.get("metric"),
                     "inverse_consistency_mm": q.get("inverse_consistency_mm"), "body_dice": q.get("body_dice"),
                     "passed": bool(q.get("passed", False)), "reasons": "; ".join(q.get("reasons") or [])})
    return pd.DataFrame(rows)


def _flags(docs: Sequence[dict[str, Any]], limits_exceeded: Sequence[dict[str, Any]]) -> list[str]:
    seen: dict[str, None] = {}
    for d in docs:
        for v in d.get("physical_bounds") or []:
            seen[f"physically impossible: {v.get('message')}"] = None
        for f in d.get("plausibility") or []:
            seen[f"implausible header value: {f.get('message')}"] = None
    for x in limits_exceeded:
        seen[f"limit exceeded: {x.get('region')} {x.get('quantity')} ({x.get('method')}) {fmt(x.get('value_gy'))} Gy "
             f"> {fmt(x.get('limit_gy'))} Gy"] = None
    return list(seen)


def patient_page(patient: str, register_dir: str | Path, quantify_dir: str | Path,
                 dosimetry_dir: str | Path | None = None) -> str:
    """The patient's page as HTML (see the module docstring); a stage that failed is said, not hidden."""
    parts = [f"<h1>Patient {html.escape(patient)}</h1>"]
    q_fail = read_failure(quantify_dir)
    if q_fail is not None:
        parts.append(f"<p class='flag' id='failed'>quantification not available: {html.escape(str(q_fail.get('stage')))}"
                     f" failed: {html.escape(str(q_fail.get('error')))}</p>")
        return _page(patient, parts)
    elig, summary = layout.ELIGIBILITY.read(quantify_dir), layout.QUANTIFY_SUMMARY.read(quantify_dir)
    parts.append(f"<p>design {html.escape(str(elig.get('design')))}, treated lobe "
                 f"{html.escape(str(elig.get('treated_lobe') or '–'))}; prrtquant {html.escape(__version__)}</p>")
    parts += ["<h2>IA decision</h2>", _decision(elig)]
    parts += ["<h2>Target lesions (68Ga PET)</h2>",
              _table(layout.LESIONS.read(quantify_dir, text=False), _LESION_COLUMNS, "lesions", "no lesion")]
    parts += ["<h2>Lobar T/N (177Lu SPECT)</h2>",
              _table(layout.LOBES.read(quantify_dir, text=False), _LOBE_COLUMNS, "lobes",
                     "whole-liver design: no treated and control lobes")]
    docs: list[dict[str, Any]] = [summary]
    exceeded: list[dict[str, Any]] = []
    parts.append("<h2>Dosimetry (177Lu): per cycle and cumulative</h2>")
    d_fail = read_failure(dosimetry_dir) if dosimetry_dir is not None else None
    if dosimetry_dir is None or d_fail is not None:
        why = "not run" if d_fail is None else f"{d_fail.get('stage')} failed: {d_fail.get('error')}"
        parts.append(f"<p class='flag' id='dosimetry'>dosimetry not available: {html.escape(why)}</p>")
    else:
        dsum = layout.DOSIMETRY_SUMMARY.read(dosimetry_dir)
        docs.append(dsum)
        exceeded = list(dsum.get("limits_exceeded") or [])
        dose = layout.DOSIMETRY.read(dosimetry_dir, text=False)
        parts.append(_table(dose, _DOSE_COLUMNS, "dosimetry", "no 177Lu SPECT: no dosimetry"))
        parts.append(f"<p>Limits (cumulative, flagged, never decided): {html.escape(LIMIT_SOURCES)}.</p>")
    parts += ["<h2>Registration QC</h2>",
              _table(_qc_frame(layout.REGISTRATION_QC.read(register_dir)), _QC_COLUMNS, "registration_qc",
                     "no registration")]
    flags = _flags(docs, exceeded)
    parts.append("<h2>Flags</h2>")
    parts.append("<ul id='flags'>" + "".join(f"<li class='flag'>{html.escape(f)}</li>" for f in flags) + "</ul>"
                 if flags else "<p id='flags' class='ok'>none</p>")
    notes = list(dict.fromkeys([*(summary.get("notes") or []), *(elig.get("notes") or [])]))
    if notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{html.escape(str(n))}</li>" for n in notes) + "</ul>")
    return _page(patient, parts)


def _page(patient: str, parts: list[str]) -> str:
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>prrtquant: {html.escape(patient)}</title><style>{_CSS}</style></head><body>"
            + "\n".join(parts) + "</body></html>\n")


def write_patient_page(path: str | Path, patient: str, register_dir: str | Path, quantify_dir: str | Path,
                       dosimetry_dir: str | Path | None = None) -> Path:
    """Write :func:`patient_page` to ``path`` atomically."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(p) as tmp:
        tmp.write_text(patient_page(patient, register_dir, quantify_dir, dosimetry_dir), encoding="utf-8")
    return p
