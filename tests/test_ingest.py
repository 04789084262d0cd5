"""Ingest of the synthetic patients (every layout the generator makes) and of broken exports."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import SimpleITK as sitk
from scipy import ndimage

from conftest import COHORT, TEST_DATA, load_truth, physical_points, series_files
from prrtquant.cli import main
from prrtquant.stages.ingest import IngestConfig, IngestError, PatientSheet, ingest


def _sheet(patient: str) -> PatientSheet:
    return PatientSheet.from_tsv(TEST_DATA / "patients.tsv", patient)


@pytest.fixture(scope="module")
def ingested(tmp_path_factory):
    out = {}
    for p in COHORT:
        d = tmp_path_factory.mktemp(f"ingest_{p}") / "ingest"
        inv = ingest(TEST_DATA / p / "DICOM", d, _sheet(p))
        out[p] = (d, inv)
    return out


def _sphere_mask(img, center, radius, session_to_reference):
    m = np.asarray(session_to_reference)
    ref = physical_points(img) @ m[:3, :3].T + m[:3, 3]
    return np.linalg.norm(ref - np.asarray(center), axis=-1) <= radius


def test_sessions_and_roles_from_headers_and_sheet(ingested):
    for p in COHORT:
        d, inv = ingested[p]
        truth = load_truth(p)
        assert set(inv.session[inv.session != ""]) == set(truth["sessions"]), p
        for sid, st in truth["sessions"].items():
            rows = inv[inv.session == sid]
            if "ct" in st:
                assert st["ct"]["series_instance_uid"] in set(rows[rows.role == "ct"].series_instance_uid)
            if st["kind"] == "PET":
                pet = rows[rows.role == "pet"].iloc[0]
                assert pet.series_instance_uid == st["pet"]["series_instance_uid"]
                assert pet.route == st["route"]
            if st["kind"] == "SPECT":
                sp = rows[rows.role == "spect"].iloc[0]
                assert int(sp.cycle) == st["cycle"] and float(sp.hours_pi) == pytest.approx(st["hours_pi"], abs=1e-3)
        # every written path exists and is relative
        for path in inv.path[inv.path != ""]:
            assert not Path(path).is_absolute() and (d / path).exists()


def test_pet_bqml_and_suv_through_nifti(ingested):
    """PET NIfTI (LPS→RAS and back) × sidecar SUV factor reproduces truth's lesion SUVs to 0.1%."""
    for p in COHORT:
        d, inv = ingested[p]
        truth = load_truth(p)
        for sid in ("pet_iv", "pet_ia"):
            st = truth["sessions"][sid]
            img = sitk.ReadImage(str(d / sid / "pet.nii.gz"))
            side = json.loads((d / sid / "pet.json").read_text())
            assert side["units"] == "Bq/mL" and side["radionuclide"] == "Ga-68"
            assert side["injected_activity_bq"] == pytest.approx(st["injected_activity_bq"], rel=1e-5)
            assert side["suv_bw_factor"] == pytest.approx(st["suv_bw_factor_ml_per_bq"], rel=1e-5)
            np.testing.assert_allclose(img.GetOrigin(), st["pet"]["grid"]["origin"], atol=1e-3)
            arr = sitk.GetArrayFromImage(img)
            for les, info in truth["lesions"].items():
                m = _sphere_mask(img, info["center_mm"], info["radius_mm"], st["session_to_reference"])
                ref = st["reference_measured"][les]
                assert arr[m].mean() * side["suv_bw_factor"] == pytest.approx(ref["suvmean"], rel=1e-3), (p, sid, les)
                assert arr[m].mean() == pytest.approx(ref["bqml_mean"], rel=1e-3)


def test_spect_bqml_through_nifti(ingested):
    for p in COHORT:
        d, inv = ingested[p]
        truth = load_truth(p)
        for sid, st in truth["sessions"].items():
            if st["kind"] != "SPECT":
                continue
            img = sitk.ReadImage(str(d / sid / "spect.nii.gz"))
            side = json.loads((d / sid / "spect.json").read_text())
            assert side["units"] == "Bq/mL" and side["injected_activity_bq"] == pytest.approx(st["injected_activity_bq"])
            arr = sitk.GetArrayFromImage(img)
            for les, info in truth["lesions"].items():
                m = _sphere_mask(img, info["center_mm"], info["radius_mm"], st["session_to_reference"])
                ref = st["reference_measured"][les]
                assert m.sum() == ref["voxels"]
                assert arr[m].mean() == pytest.approx(ref["bqml_mean"], rel=1e-3), (p, sid, les)


def test_masks_mapped_to_canonical_names(ingested):
    for p in COHORT:
        d, inv = ingested[p]
        truth = load_truth(p)
        st = truth["sessions"][truth["reference_session"]]
        masks = inv[inv.role == "mask"]
        for source in ("rtstruct", "seg"):
            got = masks[(masks.mask_source == source) & (masks.session == truth["reference_session"])]
            assert set(got.roi) == set(st["masks"]["roi_names"]), (p, source)
        for roi, n in st["masks"]["voxels_on_reference_ct"].items():
            seg = sitk.GetArrayFromImage(sitk.ReadImage(str(d / "pet_iv" / "masks" / "seg" / f"{roi}.nii.gz")))
            rs = sitk.GetArrayFromImage(sitk.ReadImage(str(d / "pet_iv" / "masks" / "rtstruct" / f"{roi}.nii.gz")))
            assert int(seg.sum()) == n
            surface = int(np.count_nonzero(seg.astype(bool) & ~ndimage.binary_erosion(seg.astype(bool))))
            assert int(np.count_nonzero(rs != seg)) <= 2 + 0.02 * surface  # contour tolerance, see readback test
        assert not (inv.role == "unmapped_mask").any()
    # P02 carries messy names: mapped, and the original kept in the inventory
    inv2 = ingested["P02"][1]
    row = inv2[(inv2.roi == "liver_right") & (inv2.mask_source == "rtstruct")].iloc[0]
    assert row.source_roi_name == "Rt lobe"
    # P03: lesions drawn on MR
    inv3 = ingested["P03"][1]
    assert set(inv3[(inv3.session == "mr") & (inv3.role == "mask")].roi) == set(load_truth("P03")["lesions"])


def test_contour_distance_maps_follow_the_drawn_lesions(ingested):
    """Every RTSTRUCT ROI gets a signed distance map (``distance_path``) in the ingest output (P03's MR
    contours included). Sampled by trilinear interpolation (scipy) on each lesion's true sphere around
    its equator (|cos| < 0.5), it is within 0.6 mm of zero (median 0.3 mm: the surface is interpolated
    between the cohort's 6 mm CT slices); 1 mm inside and outside the sphere it has the right sign
    everywhere farther than a slice from the poles."""
    from prrtquant.geometry import Grid

    rng = np.random.default_rng(3)
    for p in COHORT:
        d, inv = ingested[p]
        truth = load_truth(p)
        rs = inv[(inv.role == "mask") & (inv.mask_source == "rtstruct")]
        assert (rs.distance_path != "").all(), p
        ref = rs[rs.session == truth["reference_session"]]
        slice_mm = truth["sessions"][truth["reference_session"]]["ct"]["grid"]["spacing"][2]
        for roi, les in truth["lesions"].items():
            path = d / ref[ref.roi == roi].iloc[0].distance_path
            assert json.loads(Path(str(path).replace(".nii.gz", ".json")).read_text())["units"] == "mm"
            img = sitk.ReadImage(str(path))
            u = rng.normal(size=(2000, 3))
            u /= np.linalg.norm(u, axis=1)[:, None]
            c, r = np.asarray(les["center_mm"]), les["radius_mm"]
            pts = np.concatenate([c + u * (r + dr) for dr in (0.0, -1.0, 1.0)])
            ijk = Grid.of(img).physical_to_index(pts)
            vals = ndimage.map_coordinates(sitk.GetArrayFromImage(img), ijk[:, ::-1].T, order=1,
                                           mode="nearest").reshape(3, -1)
            equator = np.abs(u[:, 2]) < 0.5
            err = np.abs(vals[0][equator])  # measured: max 0.17-0.51 mm, median 0.06-0.27 mm
            assert err.max() < 0.6 and np.median(err) < 0.3, (p, roi, err.max(), np.median(err))
            off_pole = np.abs(u[:, 2]) * r < r - slice_mm
            assert np.all(vals[1][off_pole] < 0) and np.all(vals[2][off_pole] > 0), (p, roi)


def test_no_identifiers_in_any_output(ingested):
    for p in COHORT:
        d, _ = ingested[p]
        ids = [v.encode() for v in load_truth(p)["identifiers"].values()]
        ids += [v.replace("^", " ").encode() for v in load_truth(p)["identifiers"].values()]
        for f in d.rglob("*"):
            if f.is_file():
                data = f.read_bytes()
                if f.name.endswith(".gz"):
                    data = gzip.decompress(data)
                for ident in ids:
                    assert ident not in data, (f, ident)


@pytest.mark.parametrize("spect_format", ["nm_bqml", "pt_bqml"])
def test_cli_ingest_with_config_and_flat_layout(tmp_path, spect_format):
    """The CLI on a flat export with random file names and junk files, sheet taken from the config; SPECT stored
    in Bq/mL as NM (Real World Value Mapping) or exported as PET objects."""
    src = tmp_path / "flat"
    assert main(["phantom", "--out", str(src), "--seed", "11", "--n-lesions", "2", "--n-extrahepatic", "1",
                 "--layout", "flat", "--spect-format", spect_format, "--messy-names", "--pseudonym", "F01",
                 "--spect-time-points", "4,24"]) == 0
    sheet = json.loads((src / "sheet.json").read_text())
    pd.DataFrame([{"patient": "F01", "dicom_dir": "flat/DICOM", "design": sheet["design"],
                   "ia_pet_study_instance_uid": sheet["ia_pet_study_instance_uid"]}]).to_csv(
        tmp_path / "patients.tsv", sep="\t", index=False)
    (tmp_path / "config.yaml").write_text(f"patients: {tmp_path / 'patients.tsv'}\n")
    out = tmp_path / "out"
    assert main(["ingest", str(src / "DICOM"), "--out", str(out), "--patient", "F01",
                 "--config", str(tmp_path / "config.yaml")]) == 0
    inv = pd.read_csv(out / "inventory.tsv", sep="\t", dtype=str, keep_default_na=False)
    assert {"pet_iv", "pet_ia", "spect_c1_4h"} <= set(inv.session)
    assert {"series_instance_uid", "modality", "session", "role", "roi", "units", "path"} <= set(inv.columns)
    truth = json.loads((src / "truth.json").read_text())
    side = json.loads((out / "spect_c1_24h" / "spect.json").read_text())
    assert side["units_in_header"] == "BQML"
    assert side["modality"] == ("PT" if spect_format == "pt_bqml" else "NM")
    img = sitk.ReadImage(str(out / "spect_c1_24h" / "spect.nii.gz"))
    st = truth["sessions"]["spect_c1_24h"]
    info = truth["lesions"]["lesion_1"]
    assert st["deformation"] is None
    m = _sphere_mask(img, info["center_mm"], info["radius_mm"], st["session_to_reference"])
    assert sitk.GetArrayFromImage(img)[m].mean() == pytest.approx(st["reference_measured"]["lesion_1"]["bqml_mean"],
                                                                 rel=1e-3)


# ----------------------------------------------------------------------------- bad input

@pytest.fixture()
def p01_copy(tmp_path):
    dst = tmp_path / "P01"
    shutil.copytree(TEST_DATA / "P01" / "DICOM", dst)
    return dst, load_truth("P01")


def _run_fails(src: Path, tmp_path: Path, match: str, sheet: PatientSheet | None = None, cfg=None) -> str:
    out = tmp_path / "out"
    with pytest.raises(IngestError, match=match) as exc:
        ingest(src, out, sheet or _sheet("P01"), cfg)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")], "temporary output left behind"
    return str(exc.value)


def _series_paths(src: Path, uid: str) -> list[Path]:
    return sorted(series_files(src)[uid])


def _edit(paths, fn):
    for p in paths:
        ds = pydicom.dcmread(p)
        fn(ds)
        ds.save_as(p)


def test_truncated_file_is_named(p01_copy, tmp_path):
    src, t = p01_copy
    f = _series_paths(src, t["sessions"]["pet_ia"]["ct"]["series_instance_uid"])[10]
    f.write_bytes(f.read_bytes()[:4000])
    msg = _run_fails(src, tmp_path, "truncated")
    assert str(f) in msg


def test_missing_weight_error_or_sheet_fallback(p01_copy, tmp_path):
    src, t = p01_copy
    uid = t["sessions"]["pet_iv"]["pet"]["series_instance_uid"]
    _edit(_series_paths(src, uid), lambda ds: delattr(ds, "PatientWeight"))
    msg = _run_fails(src, tmp_path, "PatientWeight")
    assert uid in msg
    sheet = PatientSheet(**{**_sheet("P01").__dict__, "weight_kg": t["patient"]["weight_kg"]})
    ingest(src, tmp_path / "ok", sheet)
    side = json.loads((tmp_path / "ok" / "pet_iv" / "pet.json").read_text())
    assert any("sheet" in n for n in side["notes"])
    assert side["suv_bw_factor"] == pytest.approx(t["sessions"]["pet_iv"]["suv_bw_factor_ml_per_bq"], rel=1e-5)


def test_missing_dose_and_unknown_units(p01_copy, tmp_path):
    src, t = p01_copy
    paths = _series_paths(src, t["sessions"]["pet_ia"]["pet"]["series_instance_uid"])
    _edit(paths, lambda ds: delattr(ds.RadiopharmaceuticalInformationSequence[0], "RadionuclideTotalDose"))
    _run_fails(src, tmp_path, "RadionuclideTotalDose")
    _edit(paths, lambda ds: (setattr(ds.RadiopharmaceuticalInformationSequence[0], "RadionuclideTotalDose", "1.2e8"),
                             setattr(ds, "Units", "PROPCPS")))
    _run_fails(src, tmp_path, "PROPCPS")


def test_missing_slice_and_uneven_spacing(p01_copy, tmp_path):
    src, t = p01_copy
    paths = _series_paths(src, t["sessions"]["spect_c1_24h"]["ct"]["series_instance_uid"])
    by_z = sorted(paths, key=lambda p: float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]))
    moved = by_z[20]
    backup = moved.read_bytes()
    moved.unlink()
    _run_fails(src, tmp_path, "missing slice")
    moved.write_bytes(backup)
    _edit([moved], lambda ds: setattr(ds, "ImagePositionPatient",
                                      [ds.ImagePositionPatient[0], ds.ImagePositionPatient[1],
                                       float(ds.ImagePositionPatient[2]) + 1.7]))
    _run_fails(src, tmp_path, "uneven slice spacing")


def test_structure_set_without_its_image(p01_copy, tmp_path):
    src, t = p01_copy
    for p in _series_paths(src, t["sessions"]["pet_iv"]["ct"]["series_instance_uid"]):
        p.unlink()
    _run_fails(src, tmp_path, "not in the export")


def test_mask_outside_its_image(p01_copy, tmp_path):
    src, t = p01_copy
    rs = _series_paths(src, t["sessions"]["pet_iv"]["masks"]["rtstruct_series_instance_uid"])

    def shift(ds):
        c = ds.ROIContourSequence[0].ContourSequence[0]
        pts = np.asarray(c.ContourData, dtype=float).reshape(-1, 3)
        pts[:, 2] += 900.0
        c.ContourData = [f"{v:.3f}" for v in pts.ravel()]

    _edit(rs, shift)
    msg = _run_fails(src, tmp_path, "lies on no slice")
    assert str(rs[0]) in msg


def test_two_candidate_ia_studies(p01_copy, tmp_path):
    src, t = p01_copy
    for sid in ("pet_iv", "pet_ia"):
        _edit(_series_paths(src, t["sessions"][sid]["pet"]["series_instance_uid"]),
              lambda ds: setattr(ds.RadiopharmaceuticalInformationSequence[0], "RadiopharmaceuticalRoute",
                                 "Intra-arterial"))
    _run_fails(src, tmp_path, "two candidate IA", sheet=PatientSheet(patient="P01"))


def test_spect_counts_need_a_calibration(p01_copy, tmp_path):
    src, _ = p01_copy
    _run_fails(src, tmp_path, "camera calibration", sheet=PatientSheet(
        patient="P01", ia_pet_study_instance_uid=_sheet("P01").ia_pet_study_instance_uid))
    # ... which the config can give
    ingest(src, tmp_path / "ok", PatientSheet(patient="P01",
                                              ia_pet_study_instance_uid=_sheet("P01").ia_pet_study_instance_uid),
           IngestConfig(camera_cps_per_mbq=9.6))


def test_failed_rerun_keeps_previous_output(p01_copy, tmp_path):
    src, t = p01_copy
    out = tmp_path / "out"
    ingest(src, out, _sheet("P01"))
    before = (out / "inventory.tsv").read_text()
    f = _series_paths(src, t["sessions"]["pet_ia"]["ct"]["series_instance_uid"])[3]
    f.write_bytes(f.read_bytes()[:3000])
    with pytest.raises(IngestError):
        ingest(src, out, _sheet("P01"))
    assert (out / "inventory.tsv").read_text() == before


def test_nifti_label_map_and_unmapped_roi(p01_copy, tmp_path):
    """A NIfTI label map (with its value/name table) on the reference CT grid becomes masks; an RTSTRUCT ROI
    whose name maps to nothing is written and listed as unmapped, not dropped."""
    src, t = p01_copy
    from prrtquant.geometry import Grid

    g = Grid(**{k: tuple(v) for k, v in t["sessions"]["pet_iv"]["ct"]["grid"].items()})
    lab = np.zeros(g.shape_zyx, dtype=np.uint8)
    lab[10:20, 20:30, 30:40] = 1
    lab[25:30, 20:25, 10:15] = 2
    sitk.WriteImage(g.image(lab), str(src / "labels.nii.gz"))
    (src / "labels.tsv").write_text("value\tname\n1\tSegment 5-8\n2\tKidney L\n")
    rs = _series_paths(src, t["sessions"]["pet_iv"]["masks"]["rtstruct_series_instance_uid"])
    _edit(rs, lambda ds: setattr(ds.StructureSetROISequence[0], "ROIName", "Heart"))
    out = tmp_path / "out"
    cfg = IngestConfig(roi_map={"liver_right": [r"segments? 5-8"]})
    inv = ingest(src, out, _sheet("P01"), cfg)
    nif = inv[inv.mask_source == "nifti"]
    assert set(nif.roi) == {"liver_right", "kidney_left"}
    m = sitk.GetArrayFromImage(sitk.ReadImage(str(out / nif[nif.roi == "liver_right"].path.iloc[0])))
    assert int(m.sum()) == 1000
    un = inv[inv.role == "unmapped_mask"]
    assert list(un.source_roi_name) == ["Heart"] and (out / un.path.iloc[0]).exists()


def test_nifti_mask_on_no_image_is_refused(p01_copy, tmp_path):
    src, t = p01_copy
    from prrtquant.geometry import Grid

    g = Grid(size=(10, 10, 10), spacing=(1.0, 1.0, 1.0), origin=(500.0, 0.0, 0.0))
    sitk.WriteImage(g.image(np.ones(g.shape_zyx, dtype=np.uint8)), str(src / "stray.nii.gz"))
    msg = _run_fails(src, tmp_path, "matches no image")
    assert "stray.nii.gz" in msg


def test_index_lists_an_unusable_file_and_keeps_the_rest(tmp_path):
    """The header-only index is a survey: a truncated file is a row with the reason, every series is still
    there (ingest, which converts, refuses the same export: see the bad-input tests)."""
    dicom = tmp_path / "DICOM"
    shutil.copytree(TEST_DATA / "P02" / "DICOM", dicom)
    victim = sorted(p for p in dicom.rglob("*") if p.is_file())[0]
    victim.write_bytes(victim.read_bytes()[:600])
    assert main(["index", str(dicom), "--out", str(tmp_path / "series.tsv")]) == 0
    table = pd.read_csv(tmp_path / "series.tsv", sep="\t", dtype=str, keep_default_na=False)
    bad = table[table.note != ""]
    assert list(bad.first_file) == [str(victim.relative_to(dicom))]
    assert "not a usable DICOM file" in bad.note.iloc[0]
    uids = set(series_files(TEST_DATA / "P02" / "DICOM"))
    assert set(table.series_instance_uid[table.note == ""]) == uids
