"""Shared fixtures: the bundled synthetic cohort, the external reference data (unpacked from
tests/data/external) and readers that do not use prrtquant's writers."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
TEST_DATA = ROOT / "test_data"
COHORT = ["P01", "P02", "P03"]
EXTERNAL = Path(__file__).resolve().parent / "data" / "external"  # third-party data, see its README.md


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


def unpack_external(archive: Path, dest: Path) -> Path:
    """Unpack one of the ``tests/data/external`` archives into ``dest`` (refusing links and absolute or
    escaping member paths) and return ``dest``."""
    if not archive.is_file():
        pytest.fail(f"external test data missing: {archive} (see tests/data/external/README.md)",
                    pytrace=False)
    with tarfile.open(archive, "r:xz") as tar:
        for m in tar.getmembers():
            if not (m.isfile() or m.isdir()) or m.name.startswith("/") or ".." in Path(m.name).parts:
                pytest.fail(f"{archive}: unexpected member {m.name!r}", pytrace=False)
        if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4
            tar.extractall(dest, filter="data")
        else:  # pragma: no cover - members were checked above
            tar.extractall(dest)
    return dest


@pytest.fixture(scope="session")
def ibsi_suv_dro(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The IBSI SUV digital reference objects (oncoray/suv_computation, CC BY 4.0), unpacked once per
    session; holds ``DRO/DRO_list.csv`` and ``DRO/DRO_x_y/{PT,mask}/``."""
    return unpack_external(EXTERNAL / "ibsi_suv_dro" / "DRO.tar.xz", tmp_path_factory.mktemp("ibsi_suv_dro"))


@pytest.fixture(scope="session")
def dcmqi_ct_seg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The dcmqi CT slices and DICOM-SEG samples (QIICR/dcmqi data/segmentations, BSD-3-Clause), unpacked
    once per session; holds ``ct-3slice/``, ``liver.dcm``, ``partial_overlaps.dcm``, label maps, ``23x38x3/``,
    ``24x38x3/``."""
    return unpack_external(EXTERNAL / "dcmqi_ct_seg" / "dcmqi_ct_seg.tar.xz",
                           tmp_path_factory.mktemp("dcmqi_ct_seg"))


def rewrite_image(img: sitk.Image, path: Path) -> None:
    """Overwrite a stage's NIfTI intermediate on purpose (a test's edit): the sidecar's SHA-256 follows, as
    the error for an unacknowledged change asks."""
    from prrtquant.io import sha256_of, sidecar_of

    sitk.WriteImage(img, str(path))
    side = sidecar_of(path)
    if side.exists():
        meta = json.loads(side.read_text())
        if "sha256" in meta:
            meta["sha256"] = sha256_of(path)
            side.write_text(json.dumps(meta, indent=1))


def load_truth(patient: str) -> dict:
    return json.loads((TEST_DATA / patient / "truth.json").read_text())


def series_files(dicom_dir: Path) -> dict[str, list[Path]]:
    """Series UID -> files, read from headers only (independent of the generator's layout)."""
    out: dict[str, list[Path]] = {}
    for p in sorted(dicom_dir.rglob("*")):
        if not p.is_file():
            continue
        with open(p, "rb") as fh:
            if fh.read(132)[128:132] != b"DICM":
                continue
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        out.setdefault(str(ds.SeriesInstanceUID), []).append(p)
    return out


def read_series_sitk(files: list[Path]) -> sitk.Image:
    """A per-slice series through SimpleITK/GDCM, sorted by position, as float32."""
    reader = sitk.ImageSeriesReader()
    names = reader.GetGDCMSeriesFileNames(str(files[0].parent), str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID))
    reader.SetFileNames(names)
    reader.SetOutputPixelType(sitk.sitkFloat32)
    return reader.Execute()


def physical_points(img: sitk.Image) -> np.ndarray:
    """Physical centres of all voxels, array (z, y, x, 3)."""
    size = img.GetSize()
    k, j, i = np.meshgrid(np.arange(size[2]), np.arange(size[1]), np.arange(size[0]), indexing="ij")
    ijk = np.stack([i, j, k], axis=-1).reshape(-1, 3).astype(float)
    d = np.asarray(img.GetDirection()).reshape(3, 3)
    pts = (ijk * np.asarray(img.GetSpacing())) @ d.T + np.asarray(img.GetOrigin())
    return pts.reshape(size[2], size[1], size[0], 3)


#: the order in which ``make test``'s two xdist workers take the test modules (one module per worker at a
#: time): the two long end-to-end runs first, then the modules that do not use the bundled cohort's
#: processed patients, longest first, then those that do (by then the workflow run that processed them is
#: done; see ``processed_cohort``). Modules not listed run last.
MODULE_ORDER = ["test_workflow.py", "test_slurm.py",
                "test_accuracy.py", "test_phantom_generate.py", "test_registration.py", "test_ingest.py",
                "test_package.py", "test_suv_ibsi.py", "test_seg.py", "test_phantom_readback.py", "test_nm_values.py",
                "test_dosimetry.py", "test_published_values.py", "test_quantify.py", "test_geometry.py", "test_envs.py", "test_io.py",
                "test_register_mr.py", "test_quantify_stage.py", "test_absolute_spect.py", "test_bad_input.py",
                "test_config.py", "test_dosimetry_stage.py", "test_register_stage.py",
                "test_report_browser.py"]
WORKFLOW_TEST = "tests/test_workflow.py::test_workflow_runs_on_bundled_cohort"
_WORKFLOW_SELECTED = pytest.StashKey[bool]()


def pytest_collection_modifyitems(config, items):  # noqa: ARG001 - pytest hook signature
    rank = {name: i for i, name in enumerate(MODULE_ORDER)}
    items.sort(key=lambda item: rank.get(item.path.name, len(MODULE_ORDER)))  # stable: in-file order kept


def pytest_collection_finish(session):
    session.config.stash[_WORKFLOW_SELECTED] = any(i.nodeid.endswith(WORKFLOW_TEST.split("/", 1)[1])
                                                   for i in session.items)


@contextlib.contextmanager
def _exclusive(lock: Path):
    """An exclusive lock on ``lock`` (flock), held by one pytest process at a time."""
    with open(lock, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def shared_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder shared by every pytest process of this run (the parent of the xdist workers' own)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def _shared_once(base: Path, name: str, build) -> Path:
    """``base/name`` built once per test run by ``build(folder)`` (under a lock; the other processes wait and
    reuse it). A build that failed is not retried by the others: they fail with its error."""
    d = base / name
    with _exclusive(base / f"{name}.lock"):
        failed = base / f"{name}.failed"
        if failed.exists():
            pytest.fail(f"{name}: failed in another test process: {failed.read_text()}", pytrace=False)
        if not (d / "COMPLETE").exists():
            shutil.rmtree(d, ignore_errors=True)
            try:
                build(d)
            except BaseException as exc:
                failed.write_text(f"{type(exc).__name__}: {exc}"[:4000])
                raise
            (d / "COMPLETE").write_text("")
    return d


class ProcessedCohort(Mapping):
    """patient -> folder holding ``ingest/`` and ``register/``, each patient processed by the command line
    on first access, once per test run."""

    def __init__(self, base: Path):
        self.base = base

    def __getitem__(self, patient: str) -> Path:
        if patient not in COHORT:
            raise KeyError(patient)
        from prrtquant.cli import main

        def build(d: Path) -> None:
            assert main(["ingest", str(TEST_DATA / patient / "DICOM"), "--out", str(d / "ingest"),
                         "--patient", patient, "--sheet", str(TEST_DATA / "patients.tsv")]) == 0
            assert main(["register", str(d / "ingest"), "--out", str(d / "register")]) == 0

        return _shared_once(self.base, f"processed_{patient}", build)

    def __iter__(self):
        return iter(COHORT)

    def __len__(self) -> int:
        return len(COHORT)


@pytest.fixture(scope="session")
def processed_cohort(request, tmp_path_factory) -> Mapping[str, Path]:
    """Every bundled patient ingested and registered once (default settings), shared by the stage tests.

    Maps patient -> folder holding ``ingest/`` and ``register/``. When the whole-workflow test is part of
    the run, these are its results (the same stages with the same defaults, done once for both); otherwise
    each patient is processed by ``prrtquant ingest`` and ``register`` when first looked up. Once per test
    run, xdist workers included. Tests must not modify these folders (copy them first).
    """
    if request.config.stash.get(_WORKFLOW_SELECTED, False):
        run = request.getfixturevalue("cohort_workflow_run")
        return {p: Path(run["results"]) / p for p in COHORT}
    return ProcessedCohort(shared_base(tmp_path_factory))


# ----------------------------------------------------------------------------- the whole workflow, once
SNAKEMAKE = str(Path(sys.executable).parent / "snakemake")


def sheet_with_broken_patient(folder: Path) -> Path:
    """The bundled sheet (absolute DICOM paths) plus P04: a copy of P02's export with one file truncated."""
    import pandas as pd

    sheet = pd.read_csv(ROOT / "test_data" / "patients.tsv", sep="\t", dtype=str, keep_default_na=False)
    sheet["dicom_dir"] = [str(ROOT / "test_data" / d) for d in sheet.dicom_dir]
    broken = folder / "P04_DICOM"
    shutil.copytree(ROOT / "test_data" / "P02" / "DICOM", broken)
    victim = sorted(f for f in broken.rglob("*") if f.is_file())[0]
    victim.write_bytes(victim.read_bytes()[:600])
    p04 = sheet[sheet.patient == "P02"].copy()
    p04["patient"], p04["dicom_dir"] = "P04", str(broken)
    out = folder / "patients.tsv"
    pd.concat([sheet, p04]).to_csv(out, sep="\t", index=False)
    return out


def _kill_group(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)


def _finished_stamp(d: Path) -> int:
    """A finished ingest holds its inventory, or FAILED.json for the broken P04 (recorded, also finished)."""
    return next(d / n for n in ("inventory.tsv", "FAILED.json") if (d / n).exists()).stat().st_mtime_ns


def _run_cohort_workflow(folder: Path) -> None:
    """The whole DAG on the bundled cohort plus a broken patient: killed (SIGKILL) once the first ingest is
    complete, unlocked, rerun to the end. ``run.json`` records the command, the ingests finished before the
    kill with their stamps before and after the rerun, and the rerun's exit code and log tail (the test
    asserts on them)."""
    folder.mkdir(parents=True)
    cfg = folder / "config.yaml"
    results = folder / "results"
    cfg.write_text(f"patients: {sheet_with_broken_patient(folder)}\nresults: {results}\n")
    cmd = [SNAKEMAKE, "--workflow-profile", str(ROOT / "workflow" / "profiles" / "default"), "--cores", "2",
           "--configfile", str(cfg), "--directory", str(folder)]
    first_log = folder / "first_run.log"
    with open(first_log, "w") as fh:
        first = subprocess.Popen(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 600
    finished: list[str] = []
    while time.monotonic() < deadline and first.poll() is None:
        text = first_log.read_text(errors="ignore")
        finished = re.findall(r"Finished jobid: (\d+) \(Rule: ingest\)", text)
        if finished:
            break
        time.sleep(0.5)
    still_running = first.poll() is None
    if still_running:
        _kill_group(first)  # SIGKILL: running jobs die half-way
    text = first_log.read_text(errors="ignore")
    jobs = dict(re.findall(r"rule ingest:.*?jobid: (\d+).*?wildcards: patient=(\w+)", text, re.S))
    done = [results / jobs[j] / "ingest" for j in finished]
    before = {str(d): _finished_stamp(d) for d in done}
    # a killed Snakemake leaves its lock: the documented recovery is --unlock, then the same command again
    unlock = subprocess.run([*cmd, "--unlock"], cwd=ROOT, capture_output=True, timeout=120)
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    after = {d: _finished_stamp(Path(d)) for d in before} if r.returncode == 0 else {}
    (folder / "run.json").write_text(json.dumps({
        "cmd": cmd, "results": str(results), "folder": str(folder), "killed_while_running": still_running,
        "finished_before_kill": list(before), "stamps_before": before, "stamps_after": after,
        "unlock_returncode": unlock.returncode, "rerun_returncode": r.returncode, "rerun_stderr": r.stderr[-3000:]}))


@pytest.fixture(scope="session")
def cohort_workflow_run(tmp_path_factory) -> dict:
    """The bundled cohort (plus a broken P04) through the whole workflow, once per test run (see
    :func:`_run_cohort_workflow`); its results also serve as ``processed_cohort``."""
    d = _shared_once(shared_base(tmp_path_factory), "workflow_run", _run_cohort_workflow)
    run = json.loads((d / "run.json").read_text())
    assert run["rerun_returncode"] == 0, run["rerun_stderr"]
    return run


def process_generated(patient_dir: Path, work: Path, name: str = "GEN", sessions: list[str] | None = None,
                      quantify: bool = True) -> Path:
    """A generated patient (``prrtquant phantom`` output) through ingest -> registration (-> quantification)
    with default settings, by the command line, into ``work``; ``sessions``: keep only these sessions after
    ingest. Its sheet row is built from the generator's ``sheet.json`` (no weight override)."""
    import pandas as pd

    from prrtquant.cli import main

    sheet = json.loads((patient_dir / "sheet.json").read_text())
    work.mkdir(parents=True, exist_ok=True)
    pd.DataFrame([{"patient": name, "dicom_dir": str(patient_dir / "DICOM"), "design": sheet["design"],
                   "ia_pet_study_instance_uid": sheet["ia_pet_study_instance_uid"],
                   "treated_lobe": sheet.get("treated_lobe") or "",
                   "camera_cps_per_mbq": str(sheet["camera_cps_per_mbq"]), "weight_kg": "",
                   "spect_sheet": str(patient_dir / sheet["spect_sheet"]) if sheet.get("spect_sheet") else ""}]
                 ).to_csv(work / "patients.tsv", sep="\t", index=False)
    assert main(["ingest", str(patient_dir / "DICOM"), "--out", str(work / "ingest"), "--patient", name,
                 "--sheet", str(work / "patients.tsv")]) == 0
    if sessions is not None:
        inv_path = work / "ingest" / "inventory.tsv"
        inv = pd.read_csv(inv_path, sep="\t", dtype=str, keep_default_na=False)
        inv[inv.session.isin(sessions)].to_csv(inv_path, sep="\t", index=False)
    assert main(["register", str(work / "ingest"), "--out", str(work / "register")]) == 0
    if quantify:
        assert main(["quantify", str(work / "ingest"), str(work / "register"), "--out", str(work / "quantify")]) == 0
    return work
