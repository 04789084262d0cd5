"""Shared fixtures: the bundled synthetic cohort, the external reference data (unpacked from
tests/data/external) and readers that do not use prrtquant's writers."""

from __future__ import annotations

import json
import tarfile
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


@pytest.fixture(scope="session")
def processed_cohort(tmp_path_factory) -> dict[str, Path]:
    """Every bundled patient ingested and registered once (default settings), shared by the stage tests.

    Returns patient -> folder holding ``ingest/`` and ``register/``. Tests must not modify these folders
    (copy them first).
    """
    from prrtquant.cli import main

    out = {}
    for p in COHORT:
        d = tmp_path_factory.mktemp(f"processed_{p}")
        assert main(["ingest", str(TEST_DATA / p / "DICOM"), "--out", str(d / "ingest"), "--patient", p,
                     "--sheet", str(TEST_DATA / "patients.tsv")]) == 0
        assert main(["register", str(d / "ingest"), "--out", str(d / "register")]) == 0
        out[p] = d
    return out


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
