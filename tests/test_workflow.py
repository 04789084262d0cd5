"""The Snakemake workflow: lint, dry run, and a real run on the bundled cohort."""

from __future__ import annotations

import json
from html.parser import HTMLParser
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from conftest import COHORT, ROOT, load_truth
from prrtquant.stages import layout, report

SNAKEMAKE = str(Path(sys.executable).parent / "snakemake")


def _snakemake(*args: str, cwd: Path = ROOT, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([SNAKEMAKE, *args], cwd=cwd, capture_output=True, text=True, check=check, timeout=600)


def test_lint_is_clean():
    r = _snakemake("--lint", "--cores", "1", check=False)
    assert r.returncode == 0 and "Lints for" not in r.stdout + r.stderr, r.stdout + r.stderr


def test_wrong_config_key_fails_before_any_job(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(f"patients: {ROOT / 'test_data/patients.tsv'}\nresults: {tmp_path}/r\nrezults: x\n")
    r = _snakemake("-n", "--configfile", str(cfg), check=False)
    assert r.returncode != 0
    assert "rezults" in r.stdout + r.stderr
    assert not (tmp_path / "r").exists()


def test_duplicate_patient_ids_fail_before_any_job(tmp_path):
    sheet = pd.read_csv(ROOT / "test_data" / "patients.tsv", sep="\t", dtype=str, keep_default_na=False)
    sheet["dicom_dir"] = [str(ROOT / "test_data" / d) for d in sheet.dicom_dir]
    pd.concat([sheet, sheet.iloc[:1]]).to_csv(tmp_path / "patients.tsv", sep="\t", index=False)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"patients: {tmp_path / 'patients.tsv'}\nresults: {tmp_path}/r\n")
    r = _snakemake("-n", "--configfile", str(cfg), check=False)
    assert r.returncode != 0 and "['P01'] appear more than once" in r.stdout + r.stderr
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_workflow_runs_on_bundled_cohort(cohort_workflow_run, tmp_path):
    """The whole DAG on the bundled cohort plus a broken patient: killed (SIGKILL) once the first ingest is
    complete, rerun to the end without redoing finished jobs (conftest ``cohort_workflow_run``, whose
    results the stage tests share); results, cohort outputs, report checked."""
    run = cohort_workflow_run
    cmd, results = run["cmd"], Path(run["results"])
    assert run["killed_while_running"] and run["finished_before_kill"], "no ingest job finished before the run ended"
    assert run["unlock_returncode"] == 0 and run["rerun_returncode"] == 0, run["rerun_stderr"]
    assert run["stamps_after"] == run["stamps_before"]  # finished before the kill: not redone
    assert not list(results.rglob(".*.tmp*")), "temporary output of the killed job left behind"
    table = pd.read_csv(results / "cohort" / "series.tsv", sep="\t", dtype=str)
    assert sorted(table.patient.unique()) == [*COHORT, "P04"]  # P04's index lists its broken file
    assert table[(table.patient == "P04")].note.fillna("").str.contains("not a usable DICOM file").sum() == 1
    for p in COHORT:
        t = load_truth(p)
        uids = set(table[table.patient == p].series_instance_uid)
        assert t["sessions"]["pet_ia"]["pet"]["series_instance_uid"] in uids
        assert t["sessions"]["pet_iv"]["masks"]["seg_series_instance_uid"] in uids
    inv = pd.read_csv(results / "cohort" / "inventory.tsv", sep="\t", dtype=str, keep_default_na=False)
    assert sorted(inv.patient.unique()) == COHORT
    for p in COHORT:
        t = load_truth(p)
        rows = inv[inv.patient == p]
        assert set(rows.session[rows.session != ""]) == set(t["sessions"])
        qc = json.loads((results / p / "register" / "qc.json").read_text())
        assert qc["reference_session"] == "pet_iv" and not qc["flagged"], qc["failed_sessions"]
        elig = json.loads((results / p / "quantify" / "eligibility.json").read_text())
        assert elig["eligible"] == t["enhancement_ratio"]["true_patient"]["eligible"]
        dos = pd.read_csv(results / p / "dosimetry" / "dosimetry.tsv", sep="\t", dtype={"cycle": str})
        assert {"1", "2", "cumulative"} <= set(dos.cycle)
    # the file contract (prrtquant.stages.layout): every declared file written, fixed columns as declared
    for p in COHORT:
        for stage, files in layout.OUTPUTS.items():
            folder = results / "cohort" if stage == "cohort" else results / p / stage
            for f in files:
                assert f.exists(folder), f"{stage}: {f.name} not written for {p}"
                if isinstance(f, layout.Table) and f.columns:
                    assert tuple(f.read(folder).columns) == f.columns, f"{folder / f.name}: columns differ"
        assert tuple(layout.SERIES.read(results / p).columns) == layout.SERIES.columns
    assert tuple(layout.REGISTRATION_QC_TABLE.read(results / "cohort").columns) == layout.REGISTRATION_QC_TABLE.columns
    # the broken patient: recorded at ingest, passed on, listed as failed; the others are complete
    assert json.loads((results / "P04" / "ingest" / "FAILED.json").read_text())["stage"] == "ingest"
    assert json.loads((results / "P04" / "dosimetry" / "FAILED.json").read_text())["upstream"] is True
    summary = json.loads((results / "cohort" / "summary.json").read_text())
    n_eligible = sum(load_truth(p)["enhancement_ratio"]["true_patient"]["eligible"] for p in COHORT)
    assert summary["n_patients"] == 4 and summary["n_eligible"] == n_eligible
    assert list(summary["failed"]) == ["P04"] and "ingest" in summary["failed"]["P04"]
    elig = pd.read_csv(results / "cohort" / "eligibility.tsv", sep="\t").set_index("patient")
    assert elig.loc["P04", "status"] == "failed" and (elig.loc[COHORT, "status"] == "ok").all()
    qc = pd.read_csv(results / "cohort" / "registration_qc.tsv", sep="\t", keep_default_na=False)
    for p in COHORT:  # every non-reference session (and P03's MR) registered, all passed
        rows = qc[qc.patient == p]
        assert set(rows.session) == set(load_truth(p)["sessions"]) - {"pet_iv"} and rows.passed.all(), p
    assert list(qc[qc.patient == "P04"].reasons.str.startswith("not run: ingest failed")) == [True]
    dos = pd.read_csv(results / "cohort" / "dosimetry.tsv", sep="\t")
    assert sorted(dos.patient.unique()) == COHORT
    # the report: QC overlays, tables, TAC and cohort plots, with the failed patient listed
    rep = subprocess.run([*cmd, "--report", str(tmp_path / "report.html")], cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    assert rep.returncode == 0, rep.stderr[-3000:]
    html = (tmp_path / "report.html").read_text(errors="ignore")
    for needle in ("Registration QC", "Endpoints", "Dosimetry", "Cohort", "lobar_tn_paired", "lesions.tsv",
                   "registration_qc.tsv", "physical_bounds.html", "Patients", "P01.html"):
        assert needle in html, needle
    # plausible patients: no physically impossible number anywhere
    assert pd.read_csv(results / "cohort" / "physical_bounds.tsv", sep="\t").empty
    assert summary["physical_bounds"] == {}
    # a command-line override reaches the job (validated, schema defaults filled in) and reruns it alone;
    # the same command without it reruns it again (its params changed)
    target = str(results / "P01" / "quantify")
    r = subprocess.run([*cmd, target, "--config", "quantify={threshold: 10.0}"], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "rule quantify" in r.stdout + r.stderr and "rule ingest" not in r.stdout + r.stderr
    elig10 = json.loads((results / "P01" / "quantify" / "eligibility.json").read_text())
    assert elig10["threshold"] == 10.0 and elig10["eligible"] is False
    q = json.loads((results / "P01" / "quantify" / "quantify.json").read_text())
    assert q["settings"]["max_lesions"] == 5  # a schema default, filled in by the workflow's validation
    r = subprocess.run([*cmd, target], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "rule quantify" in r.stdout + r.stderr, r.stderr[-3000:]
    elig = json.loads((results / "P01" / "quantify" / "eligibility.json").read_text())
    assert elig["threshold"] == 3.0 and elig["eligible"] is True
    # no identifier in any output, log or the report (compressed NIfTI are checked in test_ingest)
    for p in COHORT:
        t = load_truth(p)
        for f in [*results.rglob("*"), tmp_path / "report.html"]:
            if f.is_file() and not f.name.endswith(".gz"):
                text = f.read_text(errors="ignore")
                for ident in t["identifiers"].values():
                    assert ident not in text, (f, ident)


class _Tables(HTMLParser):
    """Every <table id=...> of a page as a list of rows (cell texts)."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.ids: set[str] = set()
        self._table: str | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if a.get("id"):
            self.ids.add(str(a["id"]))
        if tag == "table":
            self._table = str(a.get("id"))
            self.tables[self._table] = []
        elif tag == "tr" and self._table is not None:
            self.tables[self._table].append([])
        elif tag in ("td", "th") and self._table is not None:
            self._cell = []

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self._table is not None:
            self.tables[self._table][-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "table":
            self._table = None


def _page_tables(path: Path) -> _Tables:
    parser = _Tables()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


@pytest.mark.slow
def test_patient_pages(cohort_workflow_run):
    """Each patient's page (rule patient_page) shows the decision, lesions, lobar T/N, doses and QC as tables
    whose numbers are the stage tables' rounded to 4 significant digits; a failed patient's page says so."""
    results = Path(cohort_workflow_run["results"])
    for p in COHORT:
        page = _page_tables(results / p / "report" / f"{p}.html")
        elig = json.loads((results / p / "quantify" / "eligibility.json").read_text())
        decision = dict(r for r in page.tables["decision"] if len(r) == 2)
        assert decision["decision value"] == report.fmt(elig["value"])
        assert abs(float(decision["decision value"]) - elig["value"]) <= 5e-4 * abs(elig["value"])  # 4 digits
        assert decision["decision"].startswith("eligible" if elig["eligible"] else "not eligible")
        assert report.DECISION_WORDS[elig["statistic"]] in decision["definition"]
        lesions = pd.read_csv(results / p / "quantify" / "lesions.tsv", sep="\t")
        head, *rows = page.tables["lesions"]
        assert len(rows) == len(lesions) and head[0] == "lesion" and "ER (SUVmax)" in head
        er = [r[head.index("ER (SUVmax)")] for r in rows]
        assert er == [report.fmt(float(v)) for v in lesions.er_max]
        dos = pd.read_csv(results / p / "dosimetry" / "dosimetry.tsv", sep="\t", dtype={"cycle": str})
        head, *rows = page.tables["dosimetry"]
        assert len(rows) == len(dos) and "cumulative" in {r[0] for r in rows}
        kid = dos[(dos.region == "kidney_left") & (dos.cycle == "cumulative")].iloc[0]
        row = next(r for r in rows if r[0] == "cumulative" and r[1] == "kidney_left")
        assert row[head.index("dose, kernel (Gy)")] == report.fmt(float(kid.dose_kernel_gy))
        assert row[head.index("limit (Gy)")] == report.fmt(float(kid.limit_gy))
        qc = json.loads((results / p / "register" / "qc.json").read_text())
        assert len(page.tables["registration_qc"]) - 1 == len(qc["sessions"])
        if elig["design"] == "lobar_ia":
            lobes = pd.read_csv(results / p / "quantify" / "lobes.tsv", sep="\t")
            head, *rows = page.tables["lobes"]
            assert len(rows) == len(lobes) and [r[head.index("T/N")] for r in rows] == [
                report.fmt(float(v)) for v in lobes.tn]
        assert "flags" in page.ids
    failed = _page_tables(results / "P04" / "report" / "P04.html")
    assert "failed" in failed.ids and not failed.tables
