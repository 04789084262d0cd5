"""prrtquant as a real package: a wheel built from the sources, installed (not editable) into a fresh venv,
run from a folder outside the repository.

The wheel is built from a copy of ``pyproject.toml``, ``README.md`` and ``src/`` (nothing is written into the
checkout) and installed with ``--no-deps --no-index`` into a venv made with ``python -m venv``. The
third-party dependencies come from this test's own environment: a folder of links to its site-packages
entries *without* anything of prrtquant (no ``prrtquant*``, no editable-install ``.pth``/finder), named in a
``.pth`` file of the fresh venv, so it is searched after the standard library and after the venv's own
site-packages, as an installed dependency would be (on ``PYTHONPATH`` it would come first and, e.g., the
``dataclasses`` 0.6 backport some dependency pulls in would shadow the standard library's). The only
prrtquant the fresh interpreter can import is the installed wheel.

Checked: the wheel holds every module, ``py.typed`` and every file under ``src/prrtquant/data``;
``prrtquant --version`` prints the version of the package metadata, which is ``prrtquant.__version__``;
the package is imported from the fresh venv; ``prrtquant index`` and ``prrtquant ingest`` on the bundled
patient P01, run with the temporary folder as working directory, give the series of ``truth.json`` and an
inventory with its sessions, SPECT included.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pandas as pd
import pytest
from packaging.version import Version

from conftest import ROOT, TEST_DATA, load_truth

pytestmark = pytest.mark.slow

PATIENT = "P01"


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 300) -> str:
    res = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert res.returncode == 0, f"{cmd} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}"
    return res.stdout


def _source_version() -> str:
    init = (ROOT / "src" / "prrtquant" / "__init__.py").read_text()
    m = re.search(r'^__version__ = "([^"]+)"$', init, re.M)
    assert m, "no __version__ literal in src/prrtquant/__init__.py"
    return m[1]


def _can_build_without_isolation() -> bool:
    """This environment has the build backend pyproject asks for (else pip builds in an isolated env)."""
    try:
        return Version(importlib.metadata.version("setuptools")) >= Version("77")
    except importlib.metadata.PackageNotFoundError:
        return False


def _third_party_path(dest: Path) -> Path:
    """A folder of links to this environment's site-packages entries, minus prrtquant and the installers."""
    dest.mkdir()
    skip = re.compile(r"^(prrtquant|__editable__|_prrtquant|pip|setuptools|_distutils_hack|pkg_resources)"
                      r"([-_.].*)?$|\.pth$", re.I)
    seen: set[str] = set()
    for site in dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]):
        for entry in sorted(Path(site).iterdir()):
            if entry.name in seen or skip.search(entry.name) or entry.name == "__pycache__":
                continue
            seen.add(entry.name)
            (dest / entry.name).symlink_to(entry)
    return dest


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> dict:
    work = tmp_path_factory.mktemp("package")
    src = work / "source"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "src", src / "src",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))

    dist = work / "dist"
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", dist, src]
    if _can_build_without_isolation():
        build.insert(4, "--no-build-isolation")
    _run(build, cwd=work)
    wheels = sorted(dist.glob("prrtquant-*.whl"))
    assert len(wheels) == 1, wheels

    venv = work / "venv"
    _run([sys.executable, "-m", "venv", venv], cwd=work)
    python = venv / "bin" / "python"
    _run([python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", wheels[0]], cwd=work)

    site = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=work).strip()
    third_party = _third_party_path(work / "third_party")
    (Path(site) / "zz_prrtquant_test_third_party.pth").write_text(f"{third_party}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "CONDA"))}
    env.update(PYTHONNOUSERSITE="1", PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}")
    run_dir = work / "run"  # working directory of every command: outside the repository
    run_dir.mkdir()
    return {"wheel": wheels[0], "venv": venv, "python": python, "prrtquant": venv / "bin" / "prrtquant",
            "env": env, "cwd": run_dir}


def test_wheel_contents(installed: dict) -> None:
    names = set(zipfile.ZipFile(installed["wheel"]).namelist())
    pkg = ROOT / "src" / "prrtquant"
    expected = {f"prrtquant/{p.relative_to(pkg).as_posix()}" for p in pkg.rglob("*.py")}
    expected.add("prrtquant/py.typed")
    data = pkg / "data"
    expected |= {f"prrtquant/{p.relative_to(pkg).as_posix()}" for p in data.rglob("*")
                 if p.is_file() and "__pycache__" not in p.parts} if data.is_dir() else set()
    assert expected <= names, f"missing from the wheel: {sorted(expected - names)}"
    # nothing from outside the package (tests, workflow, test data) is shipped
    assert {n.split("/")[0] for n in names} == {"prrtquant", f"prrtquant-{_source_version()}.dist-info"}
    info = f"prrtquant-{_source_version()}.dist-info"
    with zipfile.ZipFile(installed["wheel"]) as whl:
        meta = whl.read(f"{info}/METADATA").decode()
        entry_points = whl.read(f"{info}/entry_points.txt").decode()
    assert re.search(rf"^Version: {re.escape(_source_version())}$", meta, re.M)
    assert "prrtquant = prrtquant.cli:main" in entry_points


def test_version_from_metadata(installed: dict) -> None:
    out = _run([installed["prrtquant"], "--version"], cwd=installed["cwd"], env=installed["env"])
    version = _source_version()
    assert out.strip() == f"prrtquant {version}"
    meta = _run([installed["python"], "-c", "import importlib.metadata as m; print(m.version('prrtquant'))"],
                cwd=installed["cwd"], env=installed["env"])
    assert meta.strip() == version
    assert installed["wheel"].name.startswith(f"prrtquant-{version}-")


def test_imported_from_the_fresh_venv(installed: dict) -> None:
    probe = textwrap.dedent("""\
        import importlib.metadata, importlib.resources, json, sys
        import prrtquant, prrtquant.cli
        files = importlib.resources.files("prrtquant")
        data = files / "data"
        print(json.dumps({
            "file": prrtquant.__file__, "cli": prrtquant.cli.__file__,
            "dist": str(importlib.metadata.distribution("prrtquant").locate_file("prrtquant/__init__.py")),
            "py_typed": (files / "py.typed").is_file(), "sys_path": sys.path,
            "data": {p.name: p.read_bytes().hex() for p in data.iterdir() if p.is_file()}
            if data.is_dir() else {},
        }))
        """)
    got = json.loads(_run([installed["python"], "-c", probe], cwd=installed["cwd"], env=installed["env"]))
    venv = installed["venv"].resolve()
    for key in ("file", "cli", "dist"):
        path = Path(got[key]).resolve()
        assert path.is_relative_to(venv), f"{key}: {path} is not in the fresh venv {venv}"
        assert not path.is_relative_to(ROOT.resolve()), f"{key}: {path} comes from the checkout"
    src = (ROOT / "src").resolve()
    assert not [p for p in got["sys_path"] if p and Path(p).resolve().is_relative_to(src)], got["sys_path"]
    assert got["py_typed"]
    data = ROOT / "src" / "prrtquant" / "data"
    expected = {p.name: p.read_bytes().hex() for p in data.iterdir() if p.is_file()} if data.is_dir() else {}
    assert got["data"] == expected  # package data found through importlib.resources, byte for byte


def test_index_and_ingest_from_outside_the_repository(installed: dict) -> None:
    cwd, env, exe = installed["cwd"], installed["env"], installed["prrtquant"]
    dicom = TEST_DATA / PATIENT / "DICOM"
    before = sorted(p.relative_to(TEST_DATA) for p in TEST_DATA.rglob("*"))
    truth = load_truth(PATIENT)

    _run([exe, "index", dicom, "--out", "series.tsv"], cwd=cwd, env=env)
    series = pd.read_csv(cwd / "series.tsv", sep="\t", dtype=str, keep_default_na=False)
    truth_uids = {s[k]["series_instance_uid"] for s in truth["sessions"].values()
                  for k in ("ct", "pet", "spect") if k in s}
    truth_uids |= {v for s in truth["sessions"].values() for k, v in s.get("masks", {}).items()
                   if k.endswith("series_instance_uid")}
    assert len(series) == len(truth_uids) == 16
    assert set(series.series_instance_uid) == truth_uids
    assert (series.note == "").all()
    assert series.modality.value_counts().to_dict() == {"CT": 7, "NM": 5, "PT": 2, "RTSTRUCT": 1, "SEG": 1}

    _run([exe, "ingest", dicom, "--out", "ingest", "--patient", PATIENT,
          "--sheet", TEST_DATA / "patients.tsv"], cwd=cwd, env=env)
    out = cwd / "ingest"
    inv = pd.read_csv(out / "inventory.tsv", sep="\t", dtype=str, keep_default_na=False)
    assert set(inv.session) == set(truth["sessions"])
    assert set(inv.series_instance_uid) == truth_uids
    spect = inv[inv.role == "spect"]
    spect_sessions = {k for k, s in truth["sessions"].items() if "spect" in s}
    assert len(spect) == len(spect_sessions) == 5 and set(spect.session) == spect_sessions
    assert set(spect.modality) == {"NM"} and set(spect.units) == {"Bq/mL"}
    for rel in inv.path:
        assert (out / rel).is_file(), rel
    side = json.loads((out / spect.path.iloc[0].replace(".nii.gz", ".json")).read_text())
    assert side["prrtquant_version"] == _source_version()
    sessions = json.loads((out / "sessions.json").read_text())
    assert sessions["patient"] == PATIENT and sessions["design"] == truth["design"]
    # everything went to the working directory, nothing into the checkout
    assert sorted(p.relative_to(TEST_DATA) for p in TEST_DATA.rglob("*")) == before
