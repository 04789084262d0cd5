"""The bad-input corpus: one defect each, derived from the bundled patient P01, and the class it must get.

* **refused**: the stage stops with an error naming the file (or sheet/config entry) and the problem, and
  leaves no output under its final name;
* **flagged**: the stage completes and records the implausible value (``plausibility`` in the sidecar and
  ``sessions.json``, then quantify.json, the eligibility flags and the cohort's ``status``);
* **handled**: the stage completes with the same numbers as the clean export.

To stay fast the defects are applied to copies of a part of P01: its two PET/CT studies (``PET``), or
three of its SPECT/CT studies (``SPECT``: cycle 1 at 4 h and 24 h, cycle 2 at 24 h); README "Bad input"
lists the classes.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import pydicom
import pytest
import SimpleITK as sitk
import yaml

from conftest import TEST_DATA, rewrite_image
from prrtquant.cli import main
from prrtquant.stages.ingest import IngestConfig, IngestError, PatientSheet, ingest

P01 = TEST_DATA / "P01" / "DICOM"
PET = ("ST000", "ST001")  # IV, IA PET/CT
SPECT = ("ST002", "ST003", "ST006")  # cycle 1 4 h, 24 h; cycle 2 24 h
MASK_SERIES = ("SE003", "SE004")  # RTSTRUCT, SEG of ST000 (not needed here)


def _copy(dst: Path, studies: tuple[str, ...]) -> Path:
    for st in studies:
        shutil.copytree(P01 / st, dst / st, ignore=lambda d, names: [n for n in names if n in MASK_SERIES])
    return dst


def _study_uid(study: Path) -> str:
    f = next(p for p in sorted((study / "SE002").iterdir()))
    return str(pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID)


def _sheet(src: Path, **kw) -> PatientSheet:
    base = pd.read_csv(TEST_DATA / "patients.tsv", sep="\t", dtype=str, keep_default_na=False)
    row = base[base.patient == "P01"].iloc[0]
    ia = _study_uid(src / "ST001") if (src / "ST001").exists() else None
    args = dict(patient="BAD", design=row.design, ia_pet_study_instance_uid=ia, treated_lobe=row.treated_lobe,
                camera_cps_per_mbq=float(row.camera_cps_per_mbq) if row.camera_cps_per_mbq else None)
    args.update(kw)
    return PatientSheet(**args)


def _files(src: Path, study: str, series: str = "SE002") -> list[Path]:
    return sorted((src / study / series).iterdir())


def _edit(paths: list[Path], fn: Callable[[pydicom.Dataset], None]) -> None:
    for p in paths:
        ds = pydicom.dcmread(p)
        fn(ds)
        ds.save_as(p)


def _sorted_slices(src: Path, study: str) -> list[Path]:
    """The PET slices of ``study`` in position order (first = one edge)."""
    fs = _files(src, study)
    return sorted(fs, key=lambda p: float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]))


def _refused(src: Path, tmp_path: Path, match: str, *, names: Path | str | None = None,
             sheet: PatientSheet | None = None, cfg: IngestConfig | None = None) -> str:
    out = tmp_path / "out"
    with pytest.raises(IngestError, match=match) as exc:
        ingest(src, out, sheet or _sheet(src), cfg)
    msg = str(exc.value)
    if names is not None:
        assert str(names) in msg, msg
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".out")], "temporary output left behind"
    return msg


def _ingested(src: Path, tmp_path: Path, sheet: PatientSheet | None = None, cfg: IngestConfig | None = None,
              name: str = "out") -> Path:
    out = tmp_path / name
    ingest(src, out, sheet or _sheet(src), cfg)
    return out


def _flags(out: Path) -> list[dict]:
    return json.loads((out / "sessions.json").read_text())["plausibility"]


@pytest.fixture(scope="module")
def clean_pet(tmp_path_factory) -> Path:
    """The clean PET part of P01, ingested (the reference of 'handled' cases)."""
    d = tmp_path_factory.mktemp("clean_pet")
    src = _copy(d / "src", PET)
    return _ingested(src, d)


@pytest.fixture(scope="module")
def clean_spect(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("clean_spect")
    src = _copy(d / "src", SPECT)
    return _ingested(src, d)


@pytest.fixture()
def pet(tmp_path) -> Path:
    return _copy(tmp_path / "src", PET)


@pytest.fixture()
def spect(tmp_path) -> Path:
    return _copy(tmp_path / "src", SPECT)


def _same_as(out: Path, ref: Path, image: str = "pet_iv/pet.nii.gz") -> None:
    a = sitk.GetArrayFromImage(sitk.ReadImage(str(out / image)))
    b = sitk.GetArrayFromImage(sitk.ReadImage(str(ref / image)))
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=0)
    sa = json.loads((out / image.replace(".nii.gz", ".json")).read_text())
    sb = json.loads((ref / image.replace(".nii.gz", ".json")).read_text())
    for key in ("suv_bw_factor", "injected_activity_bq", "half_life_s", "weight_kg"):
        if key in sb:
            assert sa[key] == pytest.approx(sb[key], rel=1e-9), key


# ============================================================================= PET header values: refused

@pytest.mark.parametrize("weight, match", [("900", "PatientWeight .*900 kg is outside the plausible 30-250 kg"),
                                           ("7", "PatientWeight .*7 kg is outside"),
                                           ("400000", "PatientWeight .*400 kg is outside")])
def test_implausible_weight_is_refused(pet, tmp_path, weight, match):
    fs = _files(pet, "ST000")
    _edit(fs, lambda ds: setattr(ds, "PatientWeight", weight))
    _refused(pet, tmp_path, match, names=fs[0].parent)


def test_weight_in_grams_is_handled(pet, tmp_path, clean_pet):
    fs = _files(pet, "ST000")
    w = float(pydicom.dcmread(fs[0], stop_before_pixels=True).PatientWeight)
    _edit(fs, lambda ds: setattr(ds, "PatientWeight", str(round(w * 1000))))
    out = _ingested(pet, tmp_path)
    _same_as(out, clean_pet)


def test_implausible_height_is_flagged(pet, tmp_path, clean_pet):
    """PatientSize is Type 3 and only enters SUL and SUV-BSA: flagged, the activity and SUVbw unchanged."""
    _edit(_files(pet, "ST001"), lambda ds: setattr(ds, "PatientSize", "2.9"))
    out = _ingested(pet, tmp_path)
    (flag,) = _flags(out)
    assert flag["quantity"] == "height_m" and flag["value"] == 2.9 and flag["where"] == "pet_ia"
    assert "PatientSize (0010,1020)" in flag["source"]
    _same_as(out, clean_pet, "pet_ia/pet.nii.gz")


@pytest.mark.parametrize("dose_bq", ["1.5e9", "5e6"])
def test_implausible_pet_activity_is_refused(pet, tmp_path, dose_bq):
    def f(ds):
        ds.RadiopharmaceuticalInformationSequence[0].RadionuclideTotalDose = dose_bq
    _edit(_files(pet, "ST000"), f)
    _refused(pet, tmp_path, r"RadionuclideTotalDose \(0018,1074\) .* MBq is outside the plausible 40-400 MBq",
             names=pet / "ST000" / "SE002")


def _shift_pet_injection(pet: Path, study: str, minutes: float) -> None:
    def f(ds):
        item = ds.RadiopharmaceuticalInformationSequence[0]
        t = dt.datetime.strptime(str(item.RadiopharmaceuticalStartDateTime)[:14], "%Y%m%d%H%M%S")
        item.RadiopharmaceuticalStartDateTime = (t + dt.timedelta(minutes=minutes)).strftime("%Y%m%d%H%M%S")
        if "RadiopharmaceuticalStartTime" in item:
            item.RadiopharmaceuticalStartTime = (t + dt.timedelta(minutes=minutes)).strftime("%H%M%S")
    _edit(_files(pet, study), f)


def test_pet_injection_a_day_early_is_refused(pet, tmp_path):
    _shift_pet_injection(pet, "ST000", -24 * 60)
    _refused(pet, tmp_path, "min; a PET is acquired 0-360 min after the injection", names=pet / "ST000" / "SE002")


def test_pet_injection_after_the_scan_is_refused(pet, tmp_path):
    _shift_pet_injection(pet, "ST001", 180)
    _refused(pet, tmp_path, "after the acquisition start")


def test_pet_uptake_outside_protocol_is_flagged(pet, tmp_path):
    _shift_pet_injection(pet, "ST000", -90)  # about 150 min instead of about 60
    out = _ingested(pet, tmp_path)
    (flag,) = _flags(out)
    assert flag["quantity"] == "uptake_time_min" and flag["where"] == "pet_iv" and 140 < flag["value"] < 160
    assert str(pet / "ST000" / "SE002") in flag["source"]
    side = json.loads((out / "pet_iv" / "pet.json").read_text())
    assert side["plausibility"] == [flag]


def test_half_life_of_another_nuclide_is_refused(pet, tmp_path):
    def f(ds):
        ds.RadiopharmaceuticalInformationSequence[0].RadionuclideHalfLife = "6586.2"  # 18F, coded 68Ga
    _edit(_files(pet, "ST000"), f)
    _refused(pet, tmp_path, r"RadionuclideHalfLife \(0018,1075\) 6586.2 s does not match the coded radionuclide Ga-68")


def test_missing_half_life_is_taken_from_the_code(pet, tmp_path, clean_pet):
    def f(ds):
        del ds.RadiopharmaceuticalInformationSequence[0].RadionuclideHalfLife
    _edit(_files(pet, "ST000"), f)
    out = _ingested(pet, tmp_path)
    _same_as(out, clean_pet)
    notes = json.loads((out / "pet_iv" / "pet.json").read_text())["notes"]
    assert any("RadionuclideHalfLife missing" in n for n in notes)


@pytest.mark.parametrize("tag, value, match", [
    ("Units", None, r"Units \(0054,1001\) missing"),
    ("Units", "CNTS", "CNTS"),
    ("DecayCorrection", None, r"DecayCorrection \(0054,1102\) missing"),
    ("DecayCorrection", "XYZ", "DecayCorrection 'XYZ' is not START, ADMIN or NONE"),
    ("PatientWeight", None, r"PatientWeight \(0010,1030\) missing"),
])
def test_missing_or_unknown_value_tags_are_refused(pet, tmp_path, tag, value, match):
    def f(ds):
        if value is None:
            delattr(ds, tag)
        else:
            setattr(ds, tag, value)
    _edit(_files(pet, "ST001"), f)
    _refused(pet, tmp_path, match, names=pet / "ST001" / "SE002")


# ============================================================================= per-slice faults: refused

def test_one_slice_without_rescale_slope_is_refused(pet, tmp_path):
    victim = _sorted_slices(pet, "ST000")[20]
    _edit([victim], lambda ds: delattr(ds, "RescaleSlope"))
    _refused(pet, tmp_path, "RescaleSlope missing on this slice but present on the others", names=victim)


@pytest.mark.parametrize("slope, match", [("1e308", "RescaleSlope .* not a usable value"),
                                          ("0", "RescaleSlope .* not a usable value"),
                                          ("-1", r"RescaleSlope \(0028,1053\) is -1.0 on slice")])
def test_one_slice_with_a_wrong_rescale_slope_is_refused(pet, tmp_path, slope, match):
    victim = _sorted_slices(pet, "ST000")[7]
    _edit([victim], lambda ds: setattr(ds, "RescaleSlope", slope))
    _refused(pet, tmp_path, match, names=victim)


def test_one_slice_with_an_intercept_is_refused(pet, tmp_path):
    victim = _sorted_slices(pet, "ST001")[3]
    assert all("RescaleIntercept" in pydicom.dcmread(p, stop_before_pixels=True) for p in _files(pet, "ST001"))
    _edit([victim], lambda ds: setattr(ds, "RescaleIntercept", "5"))
    _refused(pet, tmp_path, r"RescaleIntercept \(0028,1052\) is 5.0 on slice", names=victim)


def test_one_slice_with_another_pixel_spacing_is_refused(pet, tmp_path):
    victim = _sorted_slices(pet, "ST000")[11]
    _edit([victim], lambda ds: setattr(ds, "PixelSpacing", [float(ds.PixelSpacing[0]) * 1.1,
                                                            float(ds.PixelSpacing[1]) * 1.1]))
    _refused(pet, tmp_path, "PixelSpacing .* differs from", names=victim)


def test_one_slice_with_another_orientation_is_refused(pet, tmp_path):
    victim = _sorted_slices(pet, "ST000")[5]
    _edit([victim], lambda ds: setattr(ds, "ImageOrientationPatient", [0, 1, 0, 1, 0, 0]))
    _refused(pet, tmp_path, "ImageOrientationPatient differs", names=victim)


@pytest.mark.parametrize("where", ["edge", "middle"])
def test_deleted_slice_is_refused(pet, tmp_path, where):
    slices = _sorted_slices(pet, "ST000")
    (slices[0] if where == "edge" else slices[20]).unlink()
    msg = _refused(pet, tmp_path, "NumberOfSlices|missing slice")
    assert "43 slices found but NumberOfSlices (0054,0081) says 44" in msg or "missing slice" in msg


@pytest.mark.parametrize("where", ["edge", "middle"])
@pytest.mark.parametrize("damage", ["empty", "garbage"])
def test_unreadable_slice_is_named(pet, tmp_path, where, damage):
    slices = _sorted_slices(pet, "ST000")
    victim = slices[-1] if where == "edge" else slices[22]
    victim.write_bytes(b"" if damage == "empty" else bytes(range(256)) * 8)
    _refused(pet, tmp_path, "empty file among the DICOM files" if damage == "empty"
             else "not a readable DICOM file|unreadable DICOM header", names=victim)


def test_slice_without_the_part10_header_is_refused(pet, tmp_path):
    victim = _sorted_slices(pet, "ST000")[9]
    from pydicom.filebase import DicomBytesIO

    ds = pydicom.dcmread(victim)
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2"
    pydicom.filewriter.write_dataset(buf, ds)  # the bare data set: no preamble, no file meta
    victim.write_bytes(buf.getvalue())
    assert pydicom.dcmread(victim, force=True).SOPClassUID == ds.SOPClassUID
    _refused(pet, tmp_path, "without the Part 10 preamble", names=victim)


def test_empty_marker_file_beside_the_images_is_ignored(pet, tmp_path, clean_pet):
    (pet / "ST000" / "SE002" / "export.done").write_bytes(b"")
    _same_as(_ingested(pet, tmp_path), clean_pet)


def test_first_slice_without_pixel_spacing_is_refused(pet, tmp_path):
    victim = _sorted_slices(pet, "ST000")[0]
    _edit([victim], lambda ds: delattr(ds, "PixelSpacing"))
    _refused(pet, tmp_path, "PixelSpacing missing", names=victim)


def test_truncated_slice_is_named(pet, tmp_path):
    victim = _sorted_slices(pet, "ST001")[10]
    victim.write_bytes(victim.read_bytes()[:-200])
    _refused(pet, tmp_path, "unreadable or truncated", names=victim)


def test_duplicated_slice_is_refused(pet, tmp_path):
    victim = _sorted_slices(pet, "ST001")[10]
    shutil.copy(victim, victim.with_name(victim.name + "_copy"))
    _refused(pet, tmp_path, "two slices at the same position")


def test_slice_counts_that_disagree_are_refused(pet, tmp_path):
    victim = _sorted_slices(pet, "ST001")[10]
    _edit([victim], lambda ds: setattr(ds, "NumberOfSlices", 45))
    _refused(pet, tmp_path, r"NumberOfSlices differs between slices \(\[44, 45\]\)")


# ============================================================================= files beside the images: handled

@pytest.mark.parametrize("name, content", [("README.txt", b"exported by a workstation\n"),
                                           (".DS_Store", b"\x00\x00\x00\x01Bud1"),
                                           ("VERSION", b"1\n")])
def test_non_dicom_files_beside_the_images_are_ignored(pet, tmp_path, clean_pet, name, content):
    (pet / "ST000" / "SE002" / name).write_bytes(content)
    out = _ingested(pet, tmp_path)
    _same_as(out, clean_pet)
    assert json.loads((out / "sessions.json").read_text())["ignored_files"] == 1


def test_dicomdir_is_ignored(pet, tmp_path, clean_pet):
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.1.3.10"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.1.3.10"
    ds.FileSetID = "PRRT"
    ds.save_as(pet / "DICOMDIR", enforce_file_format=True)
    (pet / "LICENSE").write_text("viewer licence\n")  # beside a DICOMDIR at a CD's root: not an image
    out = _ingested(pet, tmp_path)
    _same_as(out, clean_pet)
    assert json.loads((out / "sessions.json").read_text())["ignored_files"] == 2


# ============================================================================= the sheet's values

def test_sheet_weight_that_disagrees_with_the_header_is_flagged(pet, tmp_path):
    out = _ingested(pet, tmp_path, sheet=_sheet(pet, weight_kg=95.0))
    fl = _flags(out)
    assert {f["quantity"] for f in fl} == {"sheet_weight_kg"} and len(fl) == 2  # both PETs
    assert all(f["value"] == 95.0 for f in fl)
    assert json.loads((out / "pet_iv" / "pet.json").read_text())["weight_kg"] == 95.0


def test_implausible_sheet_weight_is_refused(pet, tmp_path):
    _refused(pet, tmp_path, "weight_kg of the patient sheet 7500 kg is outside", sheet=_sheet(pet, weight_kg=7500.0))


def _sheet_file(tmp_path: Path, src: Path, **values) -> Path:
    base = pd.read_csv(TEST_DATA / "patients.tsv", sep="\t", dtype=str, keep_default_na=False)
    row = base[base.patient == "P01"].copy()
    row["patient"], row["dicom_dir"] = "BAD", str(src)
    row["ia_pet_study_instance_uid"] = _study_uid(src / "ST001") if (src / "ST001").exists() else ""
    for k, v in values.items():
        row[k] = v
    path = tmp_path / "patients.tsv"
    rows = [row] * (2 if values.pop("_twice", None) else 1)
    pd.concat(rows).to_csv(path, sep="\t", index=False)
    return path


def _cli_refused(tmp_path: Path, argv: list[str], capsys, *needles: str) -> str:
    """The command exits 2 with one ERROR line holding every needle, no traceback, no output."""
    out = tmp_path / "cli_out"
    capsys.readouterr()
    assert main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if " ERROR " in ln]
    assert len(errors) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in errors[0], err
    assert not out.exists()
    return errors[0]


@pytest.mark.parametrize("column, value, needle", [
    ("weight_kg", "abc", "weight_kg"),
    ("weight_kg", "-70", "weight_kg"),
    ("camera_cps_per_mbq", "-9.5", "camera_cps_per_mbq"),
    ("camera_cps_per_mbq", "nine", "camera_cps_per_mbq"),
    ("treated_lobe", "middle", "treated_lobe"),
    ("design", "lobar", "design"),
])
def test_wrong_sheet_values_are_refused_by_hand(pet, tmp_path, capsys, column, value, needle):
    sheet = _sheet_file(tmp_path, pet, **{column: value})
    _cli_refused(tmp_path, ["ingest", str(pet), "--patient", "BAD", "--sheet", str(sheet)], capsys,
                 str(sheet), needle)


def test_repeated_patient_in_the_sheet_is_refused_by_hand(pet, tmp_path, capsys):
    sheet = _sheet_file(tmp_path, pet, _twice=True)
    _cli_refused(tmp_path, ["ingest", str(pet), "--patient", "BAD", "--sheet", str(sheet)], capsys,
                 "2 rows for patient 'BAD'")


@pytest.mark.parametrize("config, needle", [
    ({"ingest": {"camera_cps_per_mbq": "nine"}}, "camera_cps_per_mbq"),
    ({"ingest": {"camera_cps_per_mbq": -9.5}}, "camera_cps_per_mbq"),
    ({"ingest": {"camera_cps_per_mbk": 9.5}}, "camera_cps_per_mbk"),
    ({"plausibility": {"weight_kg": [250, 30]}}, "plausibility.weight_kg"),
    ({"plausibility": {"weight_kg": [30]}}, "weight_kg"),
    ({"quantify": {"threshold": "high"}}, "threshold"),
])
def test_wrong_config_is_refused_by_hand(pet, tmp_path, capsys, config, needle):
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump(config))
    sheet = _sheet_file(tmp_path, pet)
    _cli_refused(tmp_path, ["ingest", str(pet), "--patient", "BAD", "--sheet", str(sheet), "--config", str(cfg)],
                 capsys, str(cfg), needle)


@pytest.mark.parametrize("where", ["under_a_file", "in_a_file"])
def test_output_that_cannot_be_written_gets_one_line(pet, tmp_path, capsys, where):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    sheet = _sheet_file(tmp_path, pet)
    out = blocker / "out" if where == "under_a_file" else blocker
    capsys.readouterr()
    assert main(["ingest", str(pet), "--patient", "BAD", "--sheet", str(sheet), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if " ERROR " in ln]
    assert len(errors) == 1 and str(blocker) in errors[0] and "Traceback" not in err, err
    assert blocker.read_text() == "not a folder"


# ============================================================================= SPECT: sessions and cycles

def _shift_spect_injection(src: Path, study: str, hours: float) -> Path:
    (f,) = _files(src, study)

    def g(ds):
        item = ds.RadiopharmaceuticalInformationSequence[0]
        t = dt.datetime.strptime(str(item.RadiopharmaceuticalStartDateTime)[:14], "%Y%m%d%H%M%S")
        t += dt.timedelta(hours=hours)
        item.RadiopharmaceuticalStartDateTime = t.strftime("%Y%m%d%H%M%S")
        if "RadiopharmaceuticalStartTime" in item:
            item.RadiopharmaceuticalStartTime = t.strftime("%H%M%S")
    _edit([f], g)
    return f


def test_clean_spect_sessions(clean_spect):
    sessions = json.loads((clean_spect / "sessions.json").read_text())
    assert sorted(sessions["sessions"]) == ["spect_c1_24h", "spect_c1_4h", "spect_c2_24h"]
    assert sessions["plausibility"] == []


def test_spect_injection_a_day_early_is_refused_not_renumbered(spect, tmp_path):
    f = _shift_spect_injection(spect, "ST003", -24)
    msg = _refused(spect, tmp_path, "one cycle's SPECTs must share one administration", names=f)
    assert "24.0 h apart" in msg and str(_files(spect, "ST002")[0]) in msg


def test_spect_injection_weeks_early_is_flagged(spect, tmp_path):
    """20 days early: another administration by the dates (a cycle of its own), so not refused; its
    scan then lies 504 h after that injection, beyond the protocol's 400 h: flagged, naming the file."""
    f = _shift_spect_injection(spect, "ST003", -20 * 24)
    out = _ingested(spect, tmp_path)
    fl = [x for x in _flags(out) if x["quantity"] == "hours_after_injection"]
    assert len(fl) == 1 and fl[0]["value"] == pytest.approx(504, abs=1) and str(f) in fl[0]["source"]


def test_spect_acquired_before_its_injection_is_refused(spect, tmp_path):
    f = _shift_spect_injection(spect, "ST002", +6)  # the 4 h scan now 2 h before its injection
    _refused(spect, tmp_path, "before its injection", names=f)


def test_spect_injections_of_one_cycle_that_disagree_are_flagged(spect, tmp_path, clean_spect):
    _shift_spect_injection(spect, "ST003", -0.25)
    out = _ingested(spect, tmp_path)
    fl = _flags(out)
    assert [f["quantity"] for f in fl] == ["injection_disagreement_min"] and fl[0]["value"] == pytest.approx(15)
    assert fl[0]["where"] == "cycle 1"
    assert sorted(json.loads((out / "sessions.json").read_text())["sessions"]) == \
        sorted(json.loads((clean_spect / "sessions.json").read_text())["sessions"])


def test_spect_long_after_injection_is_flagged(spect, tmp_path):
    (f,) = _files(spect, "ST006")

    def g(ds):
        d = dt.datetime.strptime(str(ds.SeriesDate), "%Y%m%d") + dt.timedelta(days=20)
        ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = d.strftime("%Y%m%d")
    _edit([f], g)
    _edit(_files(spect, "ST006", "SE001"), g)
    out = _ingested(spect, tmp_path)
    fl = [x for x in _flags(out) if x["quantity"] == "hours_after_injection"]
    assert len(fl) == 1 and fl[0]["value"] > 400 and str(f) in fl[0]["source"]


@pytest.mark.parametrize("dose_bq", ["7.4e10", "7.4e6"])
def test_implausible_spect_activity_is_refused(spect, tmp_path, dose_bq):
    (f,) = _files(spect, "ST006")

    def g(ds):
        ds.RadiopharmaceuticalInformationSequence[0].RadionuclideTotalDose = dose_bq
    _edit([f], g)
    _refused(spect, tmp_path, r"RadionuclideTotalDose \(0018,1074\) .* MBq is outside the plausible 500-12000 MBq",
             names=f)


# ============================================================================= intermediates: verified on read

@pytest.fixture()
def ingested_copy(processed_cohort, tmp_path) -> Path:
    dst = tmp_path / "ingest"
    shutil.copytree(processed_cohort["P01"] / "ingest", dst)
    return dst


@pytest.mark.parametrize("damage", ["truncated", "modified", "emptied", "header"])
def test_damaged_intermediate_is_refused_by_the_next_stage(ingested_copy, tmp_path, capsys, damage):
    inv = pd.read_csv(ingested_copy / "inventory.tsv", sep="\t", dtype=str, keep_default_na=False)
    rel = inv[(inv.role == "ct") & (inv.session == "pet_iv")].path.iloc[0]
    victim = ingested_copy / rel
    raw = victim.read_bytes()
    if damage == "truncated":
        victim.write_bytes(raw[: len(raw) // 2])
    elif damage == "modified":
        victim.write_bytes(raw[:-100] + bytes(b ^ 0xFF for b in raw[-100:-8]) + raw[-8:])
    elif damage == "header":  # the deflate stream broken right after the gzip header
        victim.write_bytes(raw[:10] + b"\xff" * 64 + raw[74:])
    else:
        victim.write_bytes(b"")
    capsys.readouterr()
    out = tmp_path / "register"
    assert main(["register", str(ingested_copy), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    expected = {"truncated": "truncated or damaged", "modified": "differ from the SHA-256",
                "emptied": "not a readable NIfTI image", "header": "not a readable NIfTI image"}[damage]
    assert str(victim) in err and expected in err and "Traceback" not in err, err
    assert not out.exists()


# ============================================================================= a wrong scale that reaches quantify

def test_liver_suv_outside_the_band_is_flagged_through_to_the_cohort(processed_cohort, tmp_path):
    """A PET whose values are 100x too high (a wrong scale no header check saw): quantify flags the healthy
    liver SUV, the eligibility carries the flag, the cohort lists the patient as flagged with the reason."""
    from prrtquant.stages.cohort import cohort_summary

    src = processed_cohort["P01"]
    ing = tmp_path / "ingest"
    shutil.copytree(src / "ingest", ing)
    path = ing / "pet_ia" / "pet.nii.gz"
    rewrite_image(sitk.ReadImage(str(path), sitk.sitkFloat32) * 100.0, path)
    assert main(["quantify", str(ing), str(src / "register"), "--out", str(tmp_path / "quantify")]) == 0
    q = json.loads((tmp_path / "quantify" / "quantify.json").read_text())
    (flag,) = q["plausibility"]
    assert flag["quantity"] == "healthy_liver_suvmean" and flag["where"] == "pet_ia" and flag["value"] > 40
    elig = json.loads((tmp_path / "quantify" / "eligibility.json").read_text())
    assert elig["flagged"] and "plausibility:pet_ia:healthy_liver_suvmean" in elig["qc_flags"]
    summary = cohort_summary({"P01": tmp_path / "quantify"}, tmp_path / "cohort")
    row = pd.read_csv(tmp_path / "cohort" / "eligibility.tsv", sep="\t").iloc[0]
    assert row.status == "flagged" and row.plausibility_flags == 1 and "healthy_liver_suvmean" in row.reason
    assert summary["plausibility"]["P01"] == [flag["message"]]
