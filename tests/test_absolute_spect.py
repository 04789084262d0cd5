"""Absolute 177Lu numbers: SPECT stored as consoles store it, physical bounds, one region definition.

The bundled P03 (lobar, 8 sessions, SPECT in integer counts) is re-exported here the way other consoles
store the same reconstructions (``tests/test_nm_values.reencode``, written with pydicom, not with the
phantom writer) and ingested again: the SPECT images must equal the original ingest's. P02's SPECT is
stored with a RescaleSlope (the bundled cohort; checked against its truth in test_quantify_stage and
test_dosimetry_stage). Deliberately mis-scaled inputs must be flagged, and refused with
``--on-error fail``.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import SimpleITK as sitk
from conftest import TEST_DATA, load_truth, rewrite_image
from test_nm_values import reencode

from prrtquant.cli import main

LAMBDA_H = math.log(2) / (6.647 * 24)


def _nm_files(dicom: Path) -> dict[str, Path]:
    out = {}
    for p in sorted(dicom.rglob("IM*")):
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        if ds.Modality == "NM":
            out[str(ds.SeriesInstanceUID)] = p
    return out


def _sheet(tmp: Path, dicom: Path, spect_sheet: Path | None = None) -> Path:
    df = pd.read_csv(TEST_DATA / "patients.tsv", sep="\t", dtype=str, keep_default_na=False)
    row = df[df.patient == "P03"].iloc[0].to_dict()
    row["dicom_dir"] = str(dicom)
    row["spect_sheet"] = str(spect_sheet) if spect_sheet else ""
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "patients.tsv"
    pd.DataFrame([row]).to_csv(path, sep="\t", index=False)
    return path


def _ingest(tmp: Path, dicom: Path, *extra: str, spect_sheet: Path | None = None) -> int:
    return main(["ingest", str(dicom), "--out", str(tmp / "ingest"), "--patient", "P03", "--sheet",
                 str(_sheet(tmp, dicom, spect_sheet)), *extra])


def _spect_images(ingest: Path) -> dict[str, np.ndarray]:
    inv = pd.read_csv(ingest / "inventory.tsv", sep="\t", dtype=str, keep_default_na=False)
    return {r.session: sitk.GetArrayFromImage(sitk.ReadImage(str(ingest / r.path)))
            for r in inv[inv.role == "spect"].itertuples()}


@pytest.fixture(scope="module")
def p03_dicom_copy(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("p03_dicom") / "DICOM"
    shutil.copytree(TEST_DATA / "P03" / "DICOM", d)
    return d


@pytest.mark.parametrize("style", ["counts_scaled", "xspect"])
def test_reexported_spect_ingests_to_the_same_bqml(processed_cohort, p03_dicom_copy, tmp_path, style):
    """Every NM file of P03 re-stored (counts scaled by RescaleSlope; Bq/mL by mapping and rescale agreeing):
    every SPECT image equals the original ingest's voxel by voxel within half a 16-bit quantisation step
    (max/60000), and the total activity within 0.05 % (measured 0.02 %: the rounding of integer counts onto
    the new scale)."""
    dicom = tmp_path / "DICOM"
    shutil.copytree(p03_dicom_copy, dicom)
    for src in _nm_files(dicom).values():
        reencode(src, src, style)
    assert _ingest(tmp_path, dicom) == 0
    got, ref = _spect_images(tmp_path / "ingest"), _spect_images(processed_cohort["P03"] / "ingest")
    assert set(got) == set(ref) and len(got) == 5
    for session, a in got.items():
        np.testing.assert_allclose(a, ref[session], rtol=1e-6, atol=0.5 * float(ref[session].max()) / 60000.0)
        assert a.sum(dtype=np.float64) == pytest.approx(ref[session].sum(dtype=np.float64), rel=5e-4), session


def test_starguide_export_needs_the_spect_sheet(processed_cohort, p03_dicom_copy, tmp_path):
    """GE StarGuide: acquisition time only in ImageComments, no administered activity or injection time in the
    header. Refused naming the series and the SPECT sheet; with the sheet, the same Bq/mL as the original, and
    the sidecar says where each value came from."""
    dicom = tmp_path / "DICOM"
    shutil.copytree(p03_dicom_copy, dicom)
    rows = []
    for uid, src in _nm_files(dicom).items():
        ds = pydicom.dcmread(src)
        item = ds.RadiopharmaceuticalInformationSequence[0]
        inj = pd.Timestamp(str(item.RadiopharmaceuticalStartDateTime)[:14]).isoformat()
        rows.append({"series_instance_uid": uid, "injection_datetime": inj,
                     "injected_activity_mbq": f"{float(item.RadionuclideTotalDose):.10g}"})
        ms = sum(int(r.ActualFrameDuration) * int(r.NumberOfFramesInRotation) for r in ds.RotationInformationSequence)
        for r in ds.RotationInformationSequence:
            del r.ActualFrameDuration
        ds.ImageComments = f"$ImagingDuration${ms}$"
        for kw in ("RadionuclideTotalDose", "RadiopharmaceuticalStartTime", "RadiopharmaceuticalStartDateTime"):
            delattr(item, kw)
        ds.save_as(src, enforce_file_format=True)
    assert _ingest(tmp_path / "without", dicom) == 2
    assert not (tmp_path / "without" / "ingest").exists()
    sheet = tmp_path / "spect_sheet.tsv"
    pd.DataFrame(rows).to_csv(sheet, sep="\t", index=False)
    assert _ingest(tmp_path, dicom, spect_sheet=sheet) == 0
    got, ref = _spect_images(tmp_path / "ingest"), _spect_images(processed_cohort["P03"] / "ingest")
    assert set(got) == set(ref)
    for session, a in got.items():
        np.testing.assert_allclose(a, ref[session], rtol=1e-6, atol=1e-3)
    side = json.loads(next((tmp_path / "ingest").glob("spect_c1_24h/spect.json")).read_text())
    assert side["value_sources"]["injected_activity"] == "sheet"
    assert side["value_sources"]["injection_datetime"] == "sheet"
    assert side["value_sources"]["acquisition_duration"] == "header: ImageComments $ImagingDuration$"


def test_missing_sheet_reason_names_series(p03_dicom_copy, tmp_path, capsys):
    dicom = tmp_path / "DICOM"
    shutil.copytree(p03_dicom_copy, dicom)
    uid, src = next(iter(_nm_files(dicom).items()))
    ds = pydicom.dcmread(src)
    del ds.RadiopharmaceuticalInformationSequence[0].RadionuclideTotalDose
    ds.save_as(src, enforce_file_format=True)
    assert _ingest(tmp_path, dicom) == 2
    err = capsys.readouterr().err
    assert uid in err and "RadionuclideTotalDose missing" in err and "SPECT sheet" in err


def test_spect_read_without_its_slope_is_flagged_at_ingest(p03_dicom_copy, tmp_path, capsys):
    """The issue's failure: counts stored with RescaleSlope 0.0196 read as if the slope were 1 (51x too much
    activity). Simulated by keeping the scaled integers and dropping the slope: the field-of-view activity
    exceeds the administered activity decayed to the scan. Recorded in the sidecar, inventory and
    sessions.json; with --on-error fail, refused naming the series and the numbers, nothing written."""
    dicom = tmp_path / "DICOM"
    shutil.copytree(p03_dicom_copy, dicom)
    uid, src = sorted(_nm_files(dicom).items())[0]
    ds = pydicom.dcmread(src)
    counts = ds.pixel_array.astype(np.float64)
    ds.PixelData = np.ascontiguousarray(np.rint(counts * 51).clip(0, 65535).astype(np.uint16)).tobytes()
    ds.save_as(src, enforce_file_format=True)
    assert _ingest(tmp_path / "fail", dicom, "--on-error", "fail") == 2
    assert not (tmp_path / "fail" / "ingest").exists()
    err = capsys.readouterr().err
    assert uid in err and "field_of_view activity_mbq" in err and "physical bound" in err
    assert _ingest(tmp_path, dicom, "--on-error", "record") == 0
    sessions = json.loads((tmp_path / "ingest" / "sessions.json").read_text())
    [v] = sessions["physical_bounds"]
    assert v["region"] == "field_of_view" and v["value"] > v["bound"] > 0 and uid in v["source"]
    inv = pd.read_csv(tmp_path / "ingest" / "inventory.tsv", sep="\t", dtype=str, keep_default_na=False)
    assert "physical bound" in inv[inv.series_instance_uid == uid].note.iloc[0]


# ------------------------------------------------------------------ quantify and dosimetry: bounds, regions

@pytest.fixture(scope="module")
def p03_stages(processed_cohort, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("p03_stages")
    for stage in ("ingest", "register"):
        (d / stage).symlink_to(processed_cohort["P03"] / stage)
    assert main(["quantify", str(d / "ingest"), str(d / "register"), "--out", str(d / "quantify")]) == 0
    # the grid's own VOIs (the region definition of quantify), so both stages measure the same voxels
    (d / "grid_voi.yaml").write_text("dosimetry:\n  fixed_voi: false\n")
    assert main(["dosimetry", str(d / "ingest"), str(d / "register"), "--out", str(d / "dosimetry"), "--config",
                 str(d / "grid_voi.yaml")]) == 0
    return d


def test_no_bound_flagged_on_a_plausible_patient(p03_stages):
    cyc = pd.read_csv(p03_stages / "quantify" / "cycles.tsv", sep="\t", keep_default_na=False)
    assert (cyc.bounds_flag == "").all()
    assert json.loads((p03_stages / "quantify" / "quantify.json").read_text())["physical_bounds"] == []
    summary = json.loads((p03_stages / "dosimetry" / "summary.json").read_text())
    assert summary["physical_bounds"] == [] and summary["physical_bounds_flagged"] is False
    dos = pd.read_csv(p03_stages / "dosimetry" / "dosimetry.tsv", sep="\t", keep_default_na=False)
    assert (dos.bounds_flag == "").all()


def test_same_region_same_activity_in_quantify_and_dosimetry(p03_stages):
    """With ``dosimetry.fixed_voi: false`` cycles.tsv (quantify) and tac.tsv (dosimetry) measure the same voxels:
    every region at every time point has the same activity (1e-9 relative), healthy liver included."""
    cyc = pd.read_csv(p03_stages / "quantify" / "cycles.tsv", sep="\t").set_index(["session", "region"])
    tac = pd.read_csv(p03_stages / "dosimetry" / "tac.tsv", sep="\t").set_index(["session", "region"])
    common = cyc.index.intersection(tac.index)
    assert len(common) >= 5 * 15
    assert {"healthy_liver", "healthy_liver_left", "healthy_liver_right"} <= set(common.get_level_values(1))
    np.testing.assert_allclose(tac.loc[common, "activity_measured_mbq"], cyc.loc[common, "activity_mbq"], rtol=1e-9)


def test_liver_margin_reaches_both_stages(p03_stages, tmp_path):
    """quantify.liver_margin_mm defines the healthy liver of both stages: with a 10 mm margin the healthy liver
    holds less activity than with none, and the same in both tables."""
    cfg = tmp_path / "config.yaml"
    cfg.write_text("quantify:\n  liver_margin_mm: 10.0\ndosimetry:\n  fixed_voi: false\n")
    d = p03_stages
    assert main(["quantify", str(d / "ingest"), str(d / "register"), "--out", str(tmp_path / "q"), "--config",
                 str(cfg)]) == 0
    assert main(["dosimetry", str(d / "ingest"), str(d / "register"), "--out", str(tmp_path / "d"), "--config",
                 str(cfg)]) == 0
    key = ["session", "region"]
    cyc = pd.read_csv(tmp_path / "q" / "cycles.tsv", sep="\t").set_index(key)
    tac = pd.read_csv(tmp_path / "d" / "tac.tsv", sep="\t").set_index(key)
    base = pd.read_csv(d / "quantify" / "cycles.tsv", sep="\t").set_index(key)
    hl = [k for k in cyc.index if k[1].startswith("healthy_liver")]
    assert hl
    np.testing.assert_allclose(tac.loc[hl, "activity_measured_mbq"], cyc.loc[hl, "activity_mbq"], rtol=1e-9)
    assert (cyc.loc[hl, "activity_mbq"] < 0.97 * base.loc[hl, "activity_mbq"]).all()
    assert json.loads((tmp_path / "d" / "summary.json").read_text())["region_definition"]["liver_margin_mm"] == 10.0


@pytest.fixture
def misscaled(p03_stages, tmp_path) -> Path:
    """P03's ingest with every SPECT 51x too high (RescaleSlope 0.0196 ignored), registration reused."""
    d = tmp_path / "mis"
    shutil.copytree(p03_stages / "ingest", d / "ingest")
    (d / "register").symlink_to((p03_stages / "register").resolve())
    inv = pd.read_csv(d / "ingest" / "inventory.tsv", sep="\t", dtype=str, keep_default_na=False)
    for r in inv[inv.role == "spect"].itertuples():
        img = sitk.ReadImage(str(d / "ingest" / r.path))
        rewrite_image(img * 51.0, d / "ingest" / r.path)
    return d


def test_misscaled_spect_is_flagged_by_quantify_and_dosimetry(misscaled, capsys):
    d = misscaled
    assert main(["quantify", str(d / "ingest"), str(d / "register"), "--out", str(d / "q_fail"),
                 "--on-error", "fail"]) == 2
    assert not (d / "q_fail").exists() and "physically impossible" in capsys.readouterr().err
    assert main(["quantify", str(d / "ingest"), str(d / "register"), "--out", str(d / "q"),
                 "--on-error", "record"]) == 0
    cyc = pd.read_csv(d / "q" / "cycles.tsv", sep="\t", keep_default_na=False)
    liver = cyc[(cyc.region == "liver") & (cyc.hours_pi < 100)]  # at 168 h even 51x stays below 100 %IA
    assert len(liver) == 4 and (liver.pct_ia > 100).all() and liver.bounds_flag.str.contains("activity_mbq").all()
    assert (cyc[cyc.pct_ia_decay_corrected <= 100 * 1.1 * 0.999].bounds_flag == "").all()
    q = json.loads((d / "q" / "quantify.json").read_text())
    assert q["physical_bounds_flagged"] and {v["region"] for v in q["physical_bounds"]} >= {"liver", "liver_right"}
    assert main(["dosimetry", str(d / "ingest"), str(d / "register"), "--out", str(d / "d_fail"),
                 "--on-error", "fail"]) == 2
    assert not (d / "d_fail").exists()
    assert main(["dosimetry", str(d / "ingest"), str(d / "register"), "--out", str(d / "d"),
                 "--on-error", "record"]) == 0
    dos = pd.read_csv(d / "d" / "dosimetry.tsv", sep="\t", dtype={"cycle": str}, keep_default_na=False)
    fov = dos[(dos.cycle == "1") & (dos.region == "field_of_view")].iloc[0]
    assert fov.tia_mbq_h > fov.injected_mbq / LAMBDA_H and "tia_mbq_h" in fov.bounds_flag
    summary = json.loads((d / "d" / "summary.json").read_text())
    assert summary["physical_bounds_flagged"]
    assert any(v["quantity"] == "tia_mbq_h" and v["region"] == "field_of_view" for v in summary["physical_bounds"])
    # the cohort lists the patient as flagged, with the reason, and the bounds table holds the rows
    out = d / "cohort"
    assert main(["cohort", "--quantify", f"P03={d / 'q'}", "--dosimetry", f"P03={d / 'd'}", "--out", str(out)]) == 0
    elig = pd.read_csv(out / "eligibility.tsv", sep="\t").set_index("patient")
    assert elig.loc["P03", "status"] == "flagged" and "physically impossible" in elig.loc["P03", "reason"]
    bounds = pd.read_csv(out / "physical_bounds.tsv", sep="\t")
    assert set(bounds.stage) == {"quantify", "dosimetry"} and (bounds.patient == "P03").all()
    assert "<table" in (out / "physical_bounds.html").read_text()
    assert "P03" in json.loads((out / "summary.json").read_text())["physical_bounds"]
    truth = load_truth("P03")
    assert all(str(v) not in (out / "physical_bounds.tsv").read_text() for v in truth["identifiers"].values())
