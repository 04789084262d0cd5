"""Cohort outputs: every patient's tables stacked, eligibility count, the LUTIA paired comparison, plots.

``cohort_summary(quantify_dirs, out_dir)`` reads each patient's ``quantify`` folder (a folder holding
``FAILED.json`` instead marks a patient whose processing failed: listed, not used) and writes into
``out_dir``:

- ``lesions.tsv``, ``organs.tsv``, ``lobes.tsv``, ``lobe_lesions.tsv``, ``cycles.tsv`` and (from the
  dosimetry folders) ``dosimetry.tsv``: stacked, with the patient pseudonym as first column;
- ``eligibility.tsv``: one row per patient (decision, value, statistic, lesions, SSTR-positive fraction,
  flags) and ``status`` (``ok``, ``flagged`` or ``failed`` with the reason);
- ``lobar_comparison.tsv``: per therapy cycle, at the T/N endpoint time point (24 h), the paired
  comparison of treated vs control lobe T/N across lobar-design patients
  (:func:`prrtquant.quantify.lobes.paired_lobe_comparison`);
- ``summary.json``: counts (patients, eligible, flagged, failed), the ER distribution per statistic, the
  paired comparisons, the failed patients and why, the patients with physically impossible numbers;
- ``physical_bounds.tsv`` and ``physical_bounds.html`` (for the report): every physically impossible
  number any stage flagged (:mod:`prrtquant.bounds`), per patient; such a patient's ``status`` is
  ``flagged`` and its ``reason`` says why;
- ``plots/er_distribution.png``, ``plots/lobar_tn_paired.png``, ``plots/uptake_by_route.png``.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

from .. import __version__
from ..io import atomic_path, read_failure
from ..quantify import QuantifyError, paired_lobe_comparison
from . import layout

log = logging.getLogger(__name__)

TABLES = tuple(layout.PATIENT_TABLES)
PLOTS = ("er_distribution", "lobar_tn_paired", "uptake_by_route")


def _read(folder: Path, name: str) -> pd.DataFrame | None:
    table = layout.PATIENT_TABLES[name]
    return table.read(folder, text=False) if table.exists(folder) else None


def stack_tables(frames: Mapping[str, pd.DataFrame | None]) -> pd.DataFrame:
    """One table of every patient's (``patient`` first); patients without the table left out, empty
    tables left out unless every one is empty."""
    parts = []
    for patient, df in frames.items():
        if df is None:
            continue
        df = df.copy()
        df.insert(0, "patient", patient)
        parts.append(df)
    parts = [p for p in parts if not p.empty] or parts[:1]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["patient"])


def _eligibility_row(patient: str, folder: Path) -> dict[str, Any]:
    fail = read_failure(folder)
    if fail is not None:
        return {"patient": patient, "status": "failed", "reason": f"{fail.get('stage')}: {fail.get('error')}",
                "design": None, "statistic": None, "value": math.nan, "threshold": math.nan, "eligible": None,
                "n_lesions": 0, "lesions": "", "sstr_positive_fraction": math.nan, "qc_flags": ""}
    e = layout.ELIGIBILITY.read(folder)
    flags = list(e.get("qc_flags") or [])
    return {"patient": patient, "status": "flagged" if e.get("flagged") else "ok", "reason": "",
            "design": e.get("design"), "statistic": e.get("statistic"),
            "value": math.nan if e.get("value") is None else float(e["value"]), "threshold": e.get("threshold"),
            "eligible": e.get("eligible"), "n_lesions": e.get("n_lesions"), "lesions": ",".join(e.get("lesions") or []),
            "sstr_positive_fraction": (math.nan if e.get("sstr_positive_fraction") is None
                                       else e["sstr_positive_fraction"]),
            "qc_flags": ";".join(flags)}


def _endpoint_rows(lobes: pd.DataFrame) -> pd.DataFrame:
    """Treated and control lobe rows at the T/N endpoint time point (``endpoint`` true)."""
    return lobes[(lobes.endpoint.astype(str).str.lower() == "true") & lobes.role.isin(["treated", "control"])]


def lobar_comparisons(lobes: pd.DataFrame) -> pd.DataFrame:
    """Paired treated-vs-control T/N per cycle at the endpoint time point, across patients."""
    cols = list(layout.LOBAR_COMPARISON.columns)
    if lobes.empty or "endpoint" not in lobes:
        return pd.DataFrame(columns=cols)
    end = _endpoint_rows(lobes)
    rows = []
    for cycle, g in end.groupby("cycle"):
        wide = g.pivot_table(index="patient", columns="role", values="tn", aggfunc="first")
        if not {"treated", "control"} <= set(wide.columns):
            continue
        ok = wide.dropna()
        ok = ok[(ok.treated > 0) & (ok.control > 0)]
        left_out = sorted(set(wide.index) - set(ok.index))
        note = f"left out (a lobe without T/N): {left_out}" if left_out else ""
        if ok.empty:
            rows.append({"cycle": cycle, "n": 0, "patients": "", "note": note or "no complete pair"})
            continue
        try:
            r = paired_lobe_comparison(ok.treated.to_list(), ok.control.to_list())
        except QuantifyError as exc:
            rows.append({"cycle": cycle, "n": len(ok), "patients": ",".join(ok.index), "note": str(exc)})
            continue
        notes = "; ".join([*r.pop("notes"), *([note] if note else [])])
        r.pop("confidence", None)
        rows.append({"cycle": cycle, **r, "patients": ",".join(ok.index), "note": notes})
    return pd.DataFrame(rows, columns=cols)


def _save_png(plt: Any, fig: Any, path: Path) -> None:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def _plots(out: Path, lesions: pd.DataFrame, lobes: pd.DataFrame, cycles: pd.DataFrame, statistic: str,
           threshold: float) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    # per-lesion ER distribution, one box per patient
    fig, ax = plt.subplots(figsize=(6, 4))
    if not lesions.empty and statistic in lesions:
        groups = [(p, g[statistic].dropna().to_numpy()) for p, g in lesions.groupby("patient")]
        groups = [(p, v) for p, v in groups if v.size]
        if groups:
            ax.boxplot([v for _, v in groups], tick_labels=[p for p, _ in groups])
            for i, (_, v) in enumerate(groups, start=1):
                ax.plot(np.full(v.size, i) + np.linspace(-0.08, 0.08, v.size), v, "o", ms=4, alpha=0.7)
    ax.axhline(threshold, color="tab:red", ls="--", lw=1, label=f"threshold {threshold:g}")
    ax.set_ylabel(f"per-lesion {statistic} (IA / IV)")
    ax.set_title("Enhancement ratio per lesion")
    ax.legend(loc="best", fontsize=8)
    _save_png(plt, fig, plots / "er_distribution.png")
    # paired lines treated vs control T/N at the endpoint of every cycle
    fig, ax = plt.subplots(figsize=(6, 4))
    if not lobes.empty and "endpoint" in lobes:
        end = _endpoint_rows(lobes)
        for (patient, cycle), g in end.groupby(["patient", "cycle"]):
            v = g.set_index("role").tn
            if {"treated", "control"} <= set(v.index) and v.notna().all():
                ax.plot([0, 1], [v["control"], v["treated"]], "o-", label=f"{patient} c{cycle}")
        if ax.lines:
            ax.legend(fontsize=7, loc="best")
    ax.set_xticks([0, 1], ["control lobe", "treated lobe"])
    ax.set_xlim(-0.3, 1.3)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_ylabel("T/N (24 h SPECT)")
    ax.set_title("Lobar T/N, paired per patient and cycle")
    _save_png(plt, fig, plots / "lobar_tn_paired.png")
    # lesion and kidney uptake (% injected activity) at 24 h by cycle route
    fig, ax = plt.subplots(figsize=(6, 4))
    if not cycles.empty:
        c = cycles[(cycles.nominal_hours_pi.round() == 24)]
        data, labels = [], []
        for kind, sel in (("lesions", c.region.str.startswith("lesion_")),
                          ("kidneys", c.region.isin(["kidney_left", "kidney_right"]))):
            for route in ("IA", "IV"):
                v = c[sel & (c.route == route)].pct_ia.dropna().to_numpy()
                if v.size:
                    data.append(v)
                    labels.append(f"{kind}\n{route} cycles")
        if data:
            ax.boxplot(data, tick_labels=labels)
    ax.set_ylabel("% of injected activity (24 h)")
    ax.set_title("SPECT uptake by cycle route")
    _save_png(plt, fig, plots / "uptake_by_route.png")




def _bounds_rows(patient: str, folders: list[Path]) -> list[dict[str, Any]]:
    """Physical-bound violations recorded by a patient's stages (each listed once)."""
    seen: dict[str, dict[str, Any]] = {}
    for folder, doc in ((f, d) for f in folders for d in (layout.QUANTIFY_SUMMARY, layout.DOSIMETRY_SUMMARY)):
        if read_failure(folder) is not None or not doc.exists(folder):
            continue
        for v in doc.read(folder).get("physical_bounds") or []:
            seen.setdefault(str(v.get("message")), {"patient": patient, **{c: v.get(c) for c in layout.PHYSICAL_BOUNDS.columns[1:]}})
    return list(seen.values())


def _plausibility_messages(folder: Path) -> list[str]:
    """Header values that ingest flagged as implausible (carried by quantify.json)."""
    if read_failure(folder) is not None or not layout.QUANTIFY_SUMMARY.exists(folder):
        return []
    return [str(f.get("message")) for f in layout.QUANTIFY_SUMMARY.read(folder).get("plausibility") or []]


def _html_table(df: pd.DataFrame, title: str, empty: str) -> str:
    """A small self-contained HTML page with one table (Snakemake's report shows HTML inline, TSV not)."""
    import html

    body = df.to_html(index=False, na_rep="", escape=True, border=0) if len(df) else f"<p>{html.escape(empty)}</p>"
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>" + html.escape(title) + "</title><style>"
            "body{font-family:sans-serif;font-size:13px}table{border-collapse:collapse}"
            "td,th{border:1px solid #bbb;padding:3px 6px;text-align:left}th{background:#eee}</style></head><body>"
            f"<h3>{html.escape(title)}</h3>{body}</body></html>")


def _flag_row(row: dict[str, Any], quantify_dir: Path, dosimetry_dir: Path | None
              ) -> tuple[list[dict[str, Any]], list[str]]:
    """Complete one patient's eligibility row (in place) with what flags or explains it: a failed dosimetry,
    physically impossible numbers, implausible header values; return (bound violations, implausible values)."""
    fail = read_failure(dosimetry_dir) if dosimetry_dir is not None else None
    if fail is not None and row["status"] != "failed":
        row["reason"] = f"dosimetry failed: {fail.get('stage')}: {fail.get('error')}"
    found = _bounds_rows(row["patient"], [quantify_dir] + ([dosimetry_dir] if dosimetry_dir is not None else []))
    row["physical_bounds"] = len(found)
    if found and row["status"] != "failed":
        row["status"] = "flagged"
        why = f"{len(found)} physically impossible value(s): {found[0]['message']}"
        row["reason"] = "; ".join(x for x in (row.get("reason"), why) if x)
    implausible = _plausibility_messages(quantify_dir)
    row["plausibility_flags"] = len(implausible)
    if implausible and row["status"] != "failed":
        row["status"] = "flagged"
        why = f"{len(implausible)} implausible header value(s): {implausible[0]}"
        row["reason"] = "; ".join(x for x in (row.get("reason"), why) if x)
    return found, implausible


def _eligibility_rows(folders: Mapping[str, Path], dos: Mapping[str, Path], failures: Mapping[str, str]
                      ) -> tuple[pd.DataFrame, list[dict[str, Any]], dict[str, list[str]]]:
    """(``eligibility.tsv``, every physical-bound violation, implausible header values per patient): one row per
    quantify folder with its failure or flag reasons, then one per patient without a quantify folder."""
    rows = [_eligibility_row(p, f) for p, f in folders.items()]
    bounds_rows: list[dict[str, Any]] = []
    plausibility: dict[str, list[str]] = {}
    for row in rows:
        p = row["patient"]
        found, plausibility[p] = _flag_row(row, folders[p], dos.get(p))
        bounds_rows += found
    for p, why in failures.items():
        rows.append({"patient": p, "status": "failed", "reason": why})
    return pd.DataFrame(rows), bounds_rows, plausibility


def _stacked_tables(ok: Mapping[str, Path], dos: Mapping[str, Path]) -> dict[str, pd.DataFrame]:
    """Every patient table stacked: quantify's of the patients that did not fail, dosimetry's likewise."""
    stacked = {name: stack_tables({p: _read(f, name) for p, f in ok.items()}) for name in TABLES
               if name != "dosimetry"}
    stacked["dosimetry"] = stack_tables({p: _read(d, "dosimetry") for p, d in dos.items() if read_failure(d) is None})
    return stacked


def _decision_rule(ok: Mapping[str, Path]) -> tuple[str, float]:
    """(statistic, threshold) of the eligibility decision: the first evaluated patient's, else the defaults."""
    statistic, threshold = "er_max", 3.0
    for f in ok.values():
        e = layout.ELIGIBILITY.read(f)
        statistic, threshold = e.get("statistic", statistic), float(e.get("threshold", threshold))
        break
    return statistic, threshold


def _er_distribution(lesions: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """Per ER statistic across every lesion of the cohort: n, median, quartiles, range (only n when empty)."""
    dist = {}
    for k in ("er_mean", "er_max", "er_peak"):
        v = lesions[k].dropna().to_numpy(dtype=float) if k in lesions else np.array([])
        dist[k] = ({"n": int(v.size), "median": float(np.median(v)), "q1": float(np.percentile(v, 25)),
                    "q3": float(np.percentile(v, 75)), "min": float(v.min()), "max": float(v.max())}
                   if v.size else {"n": 0})
    return dist


def _summary(elig: pd.DataFrame, bounds_rows: list[dict[str, Any]], plausibility: Mapping[str, list[str]],
             statistic: str, threshold: float, dist: dict[str, dict[str, Any]],
             comparisons: pd.DataFrame) -> dict[str, Any]:
    """The content of ``summary.json``: counts, failures, flags, ER distribution, lobar comparisons."""
    failed = elig[elig.status == "failed"] if "status" in elig else elig.iloc[0:0]
    return {
        "n_patients": len(elig), "n_evaluated": int((elig.status != "failed").sum()) if len(elig) else 0,
        "n_eligible": int((elig.get("eligible") == True).sum()) if len(elig) else 0,  # noqa: E712
        "n_flagged": int((elig.status == "flagged").sum()) if len(elig) else 0,
        "failed": {r.patient: r.reason for r in failed.itertuples()},
        "dosimetry_failed": {r.patient: r.reason for r in elig.itertuples()
                             if isinstance(r.reason, str) and r.reason.startswith("dosimetry failed")},
        "physical_bounds": {p: [r["message"] for r in bounds_rows if r["patient"] == p]
                            for p in dict.fromkeys(r["patient"] for r in bounds_rows)},
        "plausibility": {p: m for p, m in plausibility.items() if m},
        "statistic": statistic, "threshold": threshold, "er_distribution": dist,
        "lobar_comparison": comparisons.replace({np.nan: None}).to_dict(orient="records"),
        "prrtquant_version": __version__,
    }


def _write_outputs(out: Path, stacked: Mapping[str, pd.DataFrame], elig: pd.DataFrame, comparisons: pd.DataFrame,
                   bounds_rows: list[dict[str, Any]], statistic: str, threshold: float,
                   summary: Mapping[str, Any]) -> None:
    """Write every cohort output, each atomically, ``summary.json`` last."""
    for name, df in stacked.items():
        layout.PATIENT_TABLES[name].write_atomic(out, df)
    layout.COHORT_ELIGIBILITY.write_atomic(out, elig)
    layout.LOBAR_COMPARISON.write_atomic(out, comparisons)
    bounds = layout.PHYSICAL_BOUNDS.frame(bounds_rows)
    layout.PHYSICAL_BOUNDS.write_atomic(out, bounds)
    with atomic_path(out / "physical_bounds.html") as tmp:
        tmp.write_text(_html_table(bounds, "Physically impossible numbers (flagged, never reported as results)",
                                   f"None: every absolute number of the {len(elig)} patients is within its physical "
                                   f"bound."))
    _plots(out, stacked["lesions"], stacked["lobes"], stacked["cycles"], statistic, threshold)
    layout.COHORT_SUMMARY.write_atomic(out, summary)


def cohort_summary(quantify_dirs: Mapping[str, str | Path], out_dir: str | Path,
                   failures: Mapping[str, str] | None = None,
                   dosimetry_dirs: Mapping[str, str | Path] | None = None) -> dict[str, Any]:
    """Write the cohort outputs (see module docstring) and return ``summary.json``'s content.

    ``failures`` adds patients that have no quantify folder at all (patient → reason); ``dosimetry_dirs``
    adds each patient's dosimetry folder (``dosimetry.tsv`` is stacked; a failed dosimetry is listed).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    folders = {p: Path(d) for p, d in quantify_dirs.items()}
    ok = {p: f for p, f in folders.items() if read_failure(f) is None}
    dos = {p: Path(d) for p, d in (dosimetry_dirs or {}).items()}
    elig, bounds_rows, plausibility = _eligibility_rows(folders, dos, failures or {})
    stacked = _stacked_tables(ok, dos)
    comparisons = lobar_comparisons(stacked["lobes"])
    statistic, threshold = _decision_rule(ok)
    dist = _er_distribution(stacked["lesions"])
    summary = _summary(elig, bounds_rows, plausibility, statistic, threshold, dist, comparisons)
    _write_outputs(out, stacked, elig, comparisons, bounds_rows, statistic, threshold, summary)
    log.info("cohort: %d patients, %d eligible, %d flagged, %d failed", summary["n_patients"],
             summary["n_eligible"], summary["n_flagged"], len(summary["failed"]))
    return summary


def registration_qc_table(register_dirs: Mapping[str, str | Path]) -> pd.DataFrame:
    """One row per patient and registration (session CT, MR, or an emission with its own frame of reference):
    metric, inverse consistency (mm), body Dice, passed and the reasons; a patient whose registration stage
    did not run (failed earlier) is one row with ``passed`` false and the failure."""
    rows: list[dict[str, Any]] = []
    for patient, folder in register_dirs.items():
        fail = read_failure(folder)
        if fail is not None:
            rows.append({"patient": patient, "session": "", "registration": "", "passed": False,
                         "reasons": f"not run: {fail.get('stage')} failed: {fail.get('error')}"})
            continue
        qc = layout.REGISTRATION_QC.read(folder)
        for session, q in qc.get("sessions", {}).items():
            entries = [("ct_to_reference" if q.get("kind") is None else str(q["kind"]), q)]
            if isinstance(q.get("emission"), dict):
                entries.append(("emission_to_ct", q["emission"]))
            for kind, e in entries:
                rows.append({"patient": patient, "session": session, "registration": kind,
                             "reference_session": qc.get("reference_session"), "metric": e.get("metric"),
                             "inverse_consistency_mm": e.get("inverse_consistency_mm"),
                             "body_dice": e.get("body_dice"), "passed": bool(e.get("passed", False)),
                             "reasons": "; ".join(e.get("reasons") or [])})
    return layout.REGISTRATION_QC_TABLE.frame(rows)
