"""The Snakemake workflow: lint, dry run, and a real run on the bundled cohort."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from conftest import COHORT, ROOT, load_truth

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


@pytest.mark.slow
def test_workflow_runs_on_bundled_cohort(tmp_path):
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"patients: {ROOT / 'test_data/patients.tsv'}\nresults: {tmp_path / 'results'}\n")
    r = _snakemake("--cores", "2", "--configfile", str(cfg), "--directory", str(tmp_path), check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    table = pd.read_csv(tmp_path / "results" / "cohort" / "series.tsv", sep="\t", dtype=str)
    assert sorted(table.patient.unique()) == COHORT
    for p in COHORT:
        t = load_truth(p)
        rows = table[table.patient == p]
        uids = set(rows.series_instance_uid)
        assert t["sessions"]["pet_ia"]["pet"]["series_instance_uid"] in uids
        assert t["sessions"]["pet_iv"]["masks"]["seg_series_instance_uid"] in uids
    inv = pd.read_csv(tmp_path / "results" / "cohort" / "inventory.tsv", sep="\t", dtype=str, keep_default_na=False)
    for p in COHORT:
        t = load_truth(p)
        rows = inv[inv.patient == p]
        assert set(rows.session[rows.session != ""]) == set(t["sessions"])
        pet_ia = rows[(rows.session == "pet_ia") & (rows.role == "pet")]
        assert list(pet_ia.series_instance_uid) == [t["sessions"]["pet_ia"]["pet"]["series_instance_uid"]]
        assert (tmp_path / "results" / p / "ingest" / "pet_ia" / "pet.nii.gz").exists()
        qc = json.loads((tmp_path / "results" / p / "register" / "qc.json").read_text())
        assert qc["reference_session"] == "pet_iv" and not qc["flagged"], qc["failed_sessions"]
        assert (tmp_path / "results" / p / "register" / "pet_ia" / "masks" / "binary" / "liver.nii.gz").exists()
        elig = json.loads((tmp_path / "results" / p / "quantify" / "eligibility.json").read_text())
        if t["design"] == "whole_liver_ia":
            assert elig["eligible"] == t["enhancement_ratio"]["true_patient"]["eligible"]
    for p in COHORT:
        t = load_truth(p)
        # no identifier in any output or log (compressed NIfTI are checked in test_ingest)
        for f in (tmp_path / "results").rglob("*"):
            if f.is_file() and not f.name.endswith(".gz"):
                text = f.read_text(errors="ignore")
                for ident in t["identifiers"].values():
                    assert ident not in text, (f, ident)
