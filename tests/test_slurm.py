"""The SLURM profile, for real: a single-node SLURM on this machine runs the workflow on one patient through
snakemake-executor-plugin-slurm, and its results equal a local run's.

tests/slurm/start_slurm.sh installs Debian's slurmctld/slurmd/munge if needed (root, apt) and starts the
daemons (PIDs in a state dir); tests/slurm/stop_slurm.sh ends exactly those PIDs. No accounting database is
started: the run uses ``--slurm-status-command squeue`` (MinJobAge=600 keeps finished jobs visible to squeue).
The local run goes on at the same time as the SLURM run, which spends most of its time in per-job Snakemake
start-up and between status checks. About 5 minutes on a busy 2-core machine (measured with load ~4).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import ROOT, TEST_DATA

SNAKEMAKE = str(Path(sys.executable).parent / "snakemake")
SLURM_SCRIPTS = ROOT / "tests" / "slurm"
PROFILE = ROOT / "workflow" / "profiles" / "slurm"
PATIENT = "P01"
RUN_TIMEOUT_S = 900  # hard limit for each workflow run (the SLURM run takes ~2.5 min here)
DAEMONS = ("munged", "slurmctld", "slurmscriptd", "slurmd", "slurmstepd")
SLURM_PROGRAMS = ("slurmctld", "slurmd", "sbatch", "squeue", "sinfo", "scontrol", "munged")

# Registration is bit-reproducible with the default `registration.threads: 1` (ITK's multi-threaded Mattes MI
# is not: the order of per-thread partial sums varies from run to run, ~1e-7 relative in masks); so the SLURM
# and the local run, with default settings and ITK's default threads elsewhere, must agree to 1e-9 relative.
RTOL = 1e-9
ATOL = 1e-12


def _pids_of(names: tuple[str, ...]) -> set[int]:
    out = set()
    for name in names:
        r = subprocess.run(["pgrep", "-x", name], capture_output=True, text=True)
        out |= {int(p) for p in r.stdout.split()}
    return out


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    """A running single-node SLURM; yields the environment for its clients. Always stopped afterwards."""
    if os.geteuid() != 0:
        pytest.skip("needs root: installs slurm-wlm/munge with apt-get and starts munged, slurmctld, slurmd")
    if not all(shutil.which(p) for p in SLURM_PROGRAMS) and not shutil.which("apt-get"):
        pytest.skip("SLURM is not installed and apt-get is not available to install it")
    if shutil.which("pgrep") is None:
        pytest.skip("pgrep (procps) is needed to check that no daemon is left behind")
    partition = yaml.safe_load((PROFILE / "config.yaml").read_text())["default-resources"]["slurm_partition"]
    state = tmp_path_factory.mktemp("slurm_state")
    before = _pids_of(DAEMONS)
    started: list[tuple[str, int]] = []
    try:
        r = subprocess.run(
            ["bash", str(SLURM_SCRIPTS / "start_slurm.sh"), str(state), partition],
            capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL,
        )
        if (state / "pids").exists():
            lines = (state / "pids").read_text().splitlines()
            started = [(n, int(p)) for n, p in (ln.split() for ln in lines)]
        assert r.returncode == 0, f"start_slurm.sh failed:\n{r.stdout}\n{r.stderr}"
        yield {**os.environ, "SLURM_CONF": str(state / "slurm.conf")}
    finally:
        r = subprocess.run(
            ["bash", str(SLURM_SCRIPTS / "stop_slurm.sh"), str(state)],
            capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL,
        )
        still = [(n, p) for n, p in started if Path(f"/proc/{p}").exists()]
        leftover = _pids_of(DAEMONS) - before
        assert r.returncode == 0 and not still and not leftover, (
            f"stop_slurm.sh rc={r.returncode}, still running: {still}, new daemons left: {leftover}\n"
            f"{r.stderr}"
        )


def _write_config(tmp: Path, name: str) -> tuple[Path, Path]:
    """A one-patient sheet (dicom_dir absolute) and a config; returns (configfile, workdir)."""
    sheet = pd.read_csv(TEST_DATA / "patients.tsv", sep="\t", dtype=str, keep_default_na=False)
    sheet = sheet[sheet.patient == PATIENT].copy()
    sheet["dicom_dir"] = [str((TEST_DATA / d).resolve()) for d in sheet.dicom_dir]
    work = tmp / name
    work.mkdir()
    sheet.to_csv(work / "patients.tsv", sep="\t", index=False)
    cfg = work / "config.yaml"
    cfg.write_text(yaml.safe_dump({
        "patients": str(work / "patients.tsv"),
        "results": str(work / "results"),
        "registration": {"overlays": False},  # QC PNGs are not compared; saves time
    }))
    return cfg, work


def _start(args: list[str], work: Path, env: dict) -> tuple[subprocess.Popen, Path]:
    log = work / "snakemake.out"
    with open(log, "w") as fh:  # a file, not a pipe: nothing can block on it after a kill
        p = subprocess.Popen([SNAKEMAKE, *args], cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, start_new_session=True)
    return p, log


def _wait(p: subprocess.Popen, log: Path, what: str, deadline: float) -> str:
    try:
        p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)  # the session this test started for that run
        p.wait()
        pytest.fail(f"{what} run exceeded {RUN_TIMEOUT_S} s:\n{log.read_text()[-4000:]}")
    out = log.read_text()
    assert p.returncode == 0, f"{what} run failed (rc {p.returncode}):\n{out[-6000:]}"
    return out


# --- comparison ---------------------------------------------------------------------------------------------
def _close(a: float, b: float) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return math.isclose(a, b, rel_tol=RTOL, abs_tol=ATOL)


def _compare_json(a, b, where: str) -> list[str]:
    if isinstance(a, bool) or isinstance(b, bool) or a is None or b is None or isinstance(a, str):
        return [] if a == b else [f"{where}: {a!r} != {b!r}"]
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return [] if _close(float(a), float(b)) else [f"{where}: {a!r} != {b!r}"]
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{where}: keys {sorted(a)} != {sorted(b)}"]
        return [d for k in a for d in _compare_json(a[k], b[k], f"{where}.{k}")]
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{where}: length {len(a)} != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _compare_json(x, y, f"{where}[{i}]")]
    return [f"{where}: {type(a).__name__} {a!r} != {type(b).__name__} {b!r}"]


def _compare_tsv(fa: Path, fb: Path, where: str) -> list[str]:
    a = pd.read_csv(fa, sep="\t", dtype=str, keep_default_na=False)
    b = pd.read_csv(fb, sep="\t", dtype=str, keep_default_na=False)
    if list(a.columns) != list(b.columns) or a.shape != b.shape:
        return [f"{where}: columns/shape {list(a.columns)} {a.shape} != {list(b.columns)} {b.shape}"]
    diffs = []
    for col in a.columns:
        na = pd.to_numeric(a[col].replace("", "nan"), errors="coerce")
        nb = pd.to_numeric(b[col].replace("", "nan"), errors="coerce")
        numeric = na.notna() & nb.notna()
        text_a, text_b = a[col][~numeric], b[col][~numeric]
        if not text_a.equals(text_b):
            diffs.append(f"{where}[{col}]: text differs, e.g. {list(text_a[text_a != text_b][:3])}")
        x, y = na[numeric].to_numpy(float), nb[numeric].to_numpy(float)
        if not np.allclose(x, y, rtol=RTOL, atol=ATOL, equal_nan=True):
            bad = ~np.isclose(x, y, rtol=RTOL, atol=ATOL, equal_nan=True)
            diffs.append(f"{where}[{col}]: {x[bad][:3]} != {y[bad][:3]}")
    return diffs


_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def _compare_text_numbers(fa: Path, fb: Path, where: str) -> list[str]:
    """Text with numbers (ITK .tfm): the same words, the numbers within tolerance."""
    ta, tb = fa.read_text(), fb.read_text()
    if _NUMBER.sub("#", ta) != _NUMBER.sub("#", tb):
        return [f"{where}: text differs"]
    na, nb = [float(x) for x in _NUMBER.findall(ta)], [float(x) for x in _NUMBER.findall(tb)]
    bad = [(x, y) for x, y in zip(na, nb) if not _close(x, y)]
    return [f"{where}: numbers differ, e.g. {bad[:3]}"] if bad else []


def _compare_nifti(fa: Path, fb: Path, where: str) -> list[str]:
    a, b = nib.load(fa), nib.load(fb)
    if a.shape != b.shape or not np.allclose(a.affine, b.affine, rtol=RTOL, atol=ATOL):
        return [f"{where}: grid differs"]
    x, y = np.asanyarray(a.dataobj), np.asanyarray(b.dataobj)
    if x.dtype != y.dtype:
        return [f"{where}: dtype {x.dtype} != {y.dtype}"]
    scale = float(np.max(np.abs(x))) if x.size else 0.0
    if not np.allclose(x, y, rtol=RTOL, atol=max(ATOL, RTOL * scale), equal_nan=True):
        n = int(np.sum(~np.isclose(x, y, rtol=RTOL, atol=max(ATOL, RTOL * scale), equal_nan=True)))
        return [f"{where}: {n} voxels differ"]
    return []


def compare_results(a: Path, b: Path) -> tuple[list[str], dict[str, int]]:
    """Differences between two results folders, and how many files of each kind were compared."""
    files_a = {p.relative_to(a) for p in a.rglob("*") if p.is_file()}
    files_b = {p.relative_to(b) for p in b.rglob("*") if p.is_file()}
    diffs = []
    if files_a != files_b:
        diffs.append(f"only in {a}: {sorted(map(str, files_a - files_b))}; only in {b}: "
                     f"{sorted(map(str, files_b - files_a))}")
    counts: dict[str, int] = {}
    for rel in sorted(files_a & files_b):
        if rel.parts[0] in ("logs", "benchmarks"):  # timings, host names, dates
            continue
        name = rel.name
        if name.endswith(".tsv"):
            kind, d = "tsv", _compare_tsv(a / rel, b / rel, str(rel))
        elif name.endswith(".json"):
            kind = "json"
            d = _compare_json(json.loads((a / rel).read_text()), json.loads((b / rel).read_text()), str(rel))
        elif name.endswith(".tfm"):
            kind, d = "tfm", _compare_text_numbers(a / rel, b / rel, str(rel))
        elif name.endswith((".nii", ".nii.gz")):
            kind, d = "nifti", _compare_nifti(a / rel, b / rel, str(rel))
        else:  # PNG overlays and plots, timestamps: existence only
            kind, d = "other", []
        counts[kind] = counts.get(kind, 0) + 1
        diffs += d
    return diffs, counts


# --- the tests ----------------------------------------------------------------------------------------------
def test_profile_sets_resources_of_existing_rules():
    """A renamed rule would silently lose its wall time: every rule in set-resources must exist."""
    profile = yaml.safe_load((PROFILE / "config.yaml").read_text())
    assert profile["executor"] == "slurm"
    assert {"slurm_partition", "runtime", "mem_mb"} <= set(profile["default-resources"])
    r = subprocess.run([SNAKEMAKE, "--list-rules"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    rules = set(r.stdout.split())
    assert set(profile["set-resources"]) <= rules, sorted(set(profile["set-resources"]) - rules)


@pytest.mark.slow
def test_slurm_run_equals_local_run(slurm_cluster, tmp_path):
    env = dict(slurm_cluster)  # sbatch exports the environment to the jobs
    cfg_slurm, work_slurm = _write_config(tmp_path, "slurm")
    cfg_local, work_local = _write_config(tmp_path, "local")
    deadline = time.monotonic() + RUN_TIMEOUT_S
    slurm, slurm_log = _start(
        [
            "--workflow-profile", str(PROFILE), "--executor", "slurm",
            "--configfile", str(cfg_slurm), "--directory", str(work_slurm),
            # no slurmdbd here: sacct cannot answer, squeue can (MinJobAge=600 in tests/slurm/slurm.conf.in)
            "--slurm-status-command", "squeue",
            # first status check after 2 s instead of 40 s (later ones back off by +10 s until a job ends)
            "--slurm-init-seconds-before-status-checks", "2",
            "--slurm-keep-successful-logs",
        ],
        work_slurm, env,
    )
    local, local_log = _start(
        ["--cores", "2", "--configfile", str(cfg_local), "--directory", str(work_local)], work_local, env
    )
    try:
        out_local = _wait(local, local_log, "local", deadline)
        out_slurm = _wait(slurm, slurm_log, "SLURM", deadline)
    finally:
        for p in (slurm, local):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()

    # every job but the target rule went through sbatch, and SLURM ran it to completion
    submitted = re.findall(r"has been submitted with SLURM jobid (\d+)", out_slurm)
    remote_jobs = re.findall(r"^rule (\w+):$", out_slurm, flags=re.M)  # local ones print "localrule"
    assert "(100%) done" in out_slurm and remote_jobs, out_slurm[-4000:]
    assert len(submitted) == len(remote_jobs), out_slurm[-4000:]
    states = subprocess.run(["squeue", "--states=all", "-h", "-o", "%i %T", "-j", ",".join(submitted)],
                            env=env, capture_output=True, text=True, check=True).stdout.split("\n")
    assert {s.split()[1] for s in states if s.strip()} == {"COMPLETED"}, states
    assert "localrule all" in out_local

    diffs, counts = compare_results(work_slurm / "results", work_local / "results")
    assert not diffs, "\n".join(diffs[:40])
    assert counts.get("tsv", 0) >= 5 and counts.get("json", 0) >= 5 and counts.get("nifti", 0) >= 10, counts
