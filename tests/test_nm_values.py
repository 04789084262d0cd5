"""NM (SPECT) values by the DICOM rules: stored value -> Modality LUT or Real World Value Mapping -> units.

Files are written here with pydicom, independently of prrtquant's phantom writer, in the ways consoles
store them (docs/nm_values.md): integer counts; real-valued counts scaled into uint16 by RescaleSlope
(and an intercept); slopes per frame in the functional groups; Bq/mL through a Real World Value Mapping
only, through RescaleSlope with Units BQML only, or both agreeing (Siemens xSPECT Quant style); a
``{counts}`` mapping (Hermes style); a kBq/mL unit. Expected values are computed here from the stored
integers and the tags written, and compared to 0.1 % (most are exact to float rounding).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from prrtquant.dicom.spect import (
    NMValueError,
    acquisition_duration_s,
    decay_factor_during_acquisition,
    read_nm,
    to_bqml_at_start,
)

LU177_LAMBDA_S = math.log(2) / (6.647 * 86400)
RTOL = 1e-3  # the 0.1 % of the issue; the mappings below are exact up to float64 rounding


def _unit(code: str, meaning: str, scheme: str = "UCUM") -> Dataset:
    u = Dataset()
    u.CodeValue, u.CodingSchemeDesignator, u.CodeMeaning = code, scheme, meaning
    return u


def _rwv(slope: float, intercept: float = 0.0, code: str = "Bq/ml", meaning: str = "becquerels/milliliter",
         first: int = 0, last: int = 65535) -> Dataset:
    it = Dataset()
    it.RealWorldValueFirstValueMapped, it.RealWorldValueLastValueMapped = first, last
    it.RealWorldValueSlope, it.RealWorldValueIntercept = slope, intercept
    it.LUTLabel = code
    it.MeasurementUnitsCodeSequence = Sequence([_unit(code, meaning)])
    return it


def write_nm_file(path: Path, stored: np.ndarray, **tags: object) -> Path:
    """A minimal RECON TOMO NM object (frames, rows, cols) of uint16 ``stored`` values plus ``tags``."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.20"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.ImageType = "NM", ["ORIGINAL", "PRIMARY", "RECON TOMO", "EMISSION"]
    ds.SeriesInstanceUID, ds.StudyInstanceUID = generate_uid(), generate_uid()
    n, rows, cols = stored.shape
    ds.NumberOfFrames, ds.Rows, ds.Columns = n, rows, cols
    ds.PixelSpacing, ds.SliceThickness, ds.SpacingBetweenSlices = [4.0, 4.0], "4", "4"
    det = Dataset()
    det.ImagePositionPatient, det.ImageOrientationPatient = [0, 0, 0], [1, 0, 0, 0, 1, 0]
    ds.DetectorInformationSequence = Sequence([det])
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = np.ascontiguousarray(stored.astype(np.uint16)).tobytes()
    for k, v in tags.items():
        setattr(ds, k, v)
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="module")
def stored() -> np.ndarray:
    rng = np.random.default_rng(3)
    return rng.integers(0, 60000, size=(3, 5, 6)).astype(np.uint16)


def _values(nm) -> np.ndarray:
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(nm.image)


def test_integer_counts_without_units(tmp_path, stored):
    nm = read_nm(write_nm_file(tmp_path / "a.dcm", stored))
    assert nm.units == "CNTS"
    np.testing.assert_array_equal(_values(nm), stored.astype(float))
    assert any("taken as counts" in n for n in nm.notes)


def test_counts_scaled_with_slope_and_intercept(tmp_path, stored):
    """Real-valued counts stored as uint16 with RescaleSlope 0.0196 (the 51x of the issue) and an intercept."""
    nm = read_nm(write_nm_file(tmp_path / "a.dcm", stored, RescaleSlope="0.0196", RescaleIntercept="-2.5",
                               Units="CNTS"))
    assert nm.units == "CNTS"
    np.testing.assert_allclose(_values(nm), stored * 0.0196 - 2.5, rtol=1e-12, atol=1e-9)


def test_per_frame_slopes_in_functional_groups(tmp_path, stored):
    """Pixel Value Transformation per frame (one slope per frame) wins over a top-level slope."""
    per = []
    slopes = [0.5, 2.0, 40.0]
    for m in slopes:
        fg, pvt = Dataset(), Dataset()
        pvt.RescaleSlope, pvt.RescaleIntercept, pvt.RescaleType = f"{m}", "0", "US"
        fg.PixelValueTransformationSequence = Sequence([pvt])
        per.append(fg)
    nm = read_nm(write_nm_file(tmp_path / "a.dcm", stored, PerFrameFunctionalGroupsSequence=Sequence(per),
                               RescaleSlope="7", Units="CNTS"))
    expected = stored * np.asarray(slopes)[:, None, None]
    np.testing.assert_allclose(_values(nm), expected, rtol=1e-12)
    assert nm.slopes == tuple(slopes)


def test_bqml_by_real_world_value_mapping(tmp_path, stored):
    nm = read_nm(write_nm_file(tmp_path / "a.dcm", stored,
                               RealWorldValueMappingSequence=Sequence([_rwv(12.5, 3.0)])))
    assert nm.units == "BQML" and "RealWorldValueMapping" in nm.mapping
    np.testing.assert_allclose(_values(nm), stored * 12.5 + 3.0, rtol=1e-12)


def test_bqml_by_rescale_and_units(tmp_path, stored):
    nm = read_nm(write_nm_file(tmp_path / "a.dcm", stored, RescaleSlope="12.5", RescaleIntercept="0", Units="BQML"))
    assert nm.units == "BQML"
    np.testing.assert_allclose(_values(nm), stored * 12.5, rtol=1e-12)


def test_both_agreeing_is_not_applied_twice(tmp_path, stored):
    """RescaleSlope and a mapping with the same slope (xSPECT-like): the value is slope x SV, not slope^2 x SV."""
    nm = read_nm(write_nm_file(tmp_path / "a.dcm", stored, RescaleSlope="12.5", Units="BQML",
                               RealWorldValueMappingSequence=Sequence([_rwv(12.5)])))
    np.testing.assert_allclose(_values(nm), stored * 12.5, rtol=1e-12)
    assert any("not applied" in n for n in nm.notes)


def test_mapping_and_units_that_disagree_are_refused(tmp_path, stored):
    path = write_nm_file(tmp_path / "a.dcm", stored, RescaleSlope="12.5", Units="BQML",
                         RealWorldValueMappingSequence=Sequence([_rwv(10.0)]))
    with pytest.raises(NMValueError, match=r"a\.dcm.*give different Bq/mL"):
        read_nm(path)


def test_counts_mapping_and_kbq_unit(tmp_path, stored):
    """Hermes-style {counts} mapping gives counts; kBq/ml is converted to Bq/mL; an SUV item beside is ignored."""
    nm = read_nm(write_nm_file(tmp_path / "a.dcm", stored,
                               RealWorldValueMappingSequence=Sequence([_rwv(0.25, code="{counts}", meaning="Counts")])))
    assert nm.units == "CNTS"
    np.testing.assert_allclose(_values(nm), stored * 0.25, rtol=1e-12)
    suv = _rwv(0.001, code="{SUVbw}g/ml", meaning="Standardized Uptake Value body weight")
    nm = read_nm(write_nm_file(tmp_path / "b.dcm", stored, RealWorldValueMappingSequence=Sequence(
        [suv, _rwv(0.05, code="kBq/ml", meaning="kilobecquerels/milliliter")])))
    assert nm.units == "BQML"
    np.testing.assert_allclose(_values(nm), stored * 50.0, rtol=1e-12)
    assert any("SUVbw" in n and "ignored" in n for n in nm.notes)


@pytest.mark.parametrize("tags, message", [
    ({"Units": "GML"}, "Units .*GML.* not understood"),
    ({"RescaleSlope": "0"}, "slope must be finite and > 0"),
    ({"RescaleSlope": "1e400"}, "slope must be finite"),
    ({"RealWorldValueMappingSequence": "lut"}, "LUT data"),
    ({"RealWorldValueMappingSequence": "range"}, "outside the Real World Value Mapping's First/Last"),
    ({"CorrectedImage": ["ATTN", "DECY"]}, "DECY .* does not say to which time"),
    ({"CorrectedImage": ["ATTN"], "DecayCorrection": "START"}, "disagrees with CorrectedImage"),
])
def test_what_cannot_be_interpreted_is_refused(tmp_path, stored, tags, message):
    tags = dict(tags)
    if tags.get("RealWorldValueMappingSequence") == "lut":
        it = _rwv(1.0)
        del it.RealWorldValueSlope
        it.RealWorldValueLUTData = [0.0, 1.0]
        tags["RealWorldValueMappingSequence"] = Sequence([it])
    elif tags.get("RealWorldValueMappingSequence") == "range":
        tags["RealWorldValueMappingSequence"] = Sequence([_rwv(1.0, last=1000)])
    path = write_nm_file(tmp_path / "bad.dcm", stored, **tags)
    with pytest.raises(NMValueError, match=message) as exc:
        read_nm(path)
    assert "bad.dcm" in str(exc.value)


def test_decay_reference_from_header_or_setting(tmp_path, stored):
    path = write_nm_file(tmp_path / "a.dcm", stored, CorrectedImage=["ATTN", "DECY"])
    nm = read_nm(path, decay_reference="START")
    assert (nm.decay_correction, nm.decay_correction_source) == ("START", "setting")
    nm = read_nm(write_nm_file(tmp_path / "b.dcm", stored, CorrectedImage=["ATTN", "DECY"], DecayCorrection="ADMIN"))
    assert (nm.decay_correction, nm.decay_correction_source) == ("ADMIN", "header: DecayCorrection")
    assert read_nm(write_nm_file(tmp_path / "c.dcm", stored, CorrectedImage=["ATTN"])).decay_correction == "NONE"


def test_counts_to_bqml_absolute():
    """1.2e6 counts in a 2 mL voxel over 600 s at 10 cps/MBq: 1.2e6 / (10 x 600) = 200 MBq -> 1e8 Bq/mL, times the
    in-acquisition decay correction of 177Lu over 600 s (values are means over the acquisition)."""
    f = decay_factor_during_acquisition(LU177_LAMBDA_S, 600.0)
    assert f == pytest.approx((1 - math.exp(-LU177_LAMBDA_S * 600)) / (LU177_LAMBDA_S * 600), rel=1e-12)
    v, notes = to_bqml_at_start(np.array([1.2e6]), "CNTS", "NONE", voxel_ml=2.0, decay_constant_per_s=LU177_LAMBDA_S,
                                calibration_cps_per_mbq=10.0, duration_s=600.0)
    assert float(v[0]) == pytest.approx(1e8 / f, rel=RTOL / 100)
    assert 1.0 - f == pytest.approx(3.6e-4, rel=0.01)  # 0.036 %: 177Lu hardly decays during 10 min


def test_decay_references_to_acquisition_start():
    a = np.array([1000.0])
    t = 24 * 3600.0
    v, _ = to_bqml_at_start(a, "BQML", "ADMIN", voxel_ml=1.0, decay_constant_per_s=LU177_LAMBDA_S,
                            seconds_injection_to_start=t, duration_s=900.0)
    assert float(v[0]) == pytest.approx(1000.0 * math.exp(-LU177_LAMBDA_S * t), rel=1e-12)
    v, _ = to_bqml_at_start(a, "BQML", "START", voxel_ml=1.0, decay_constant_per_s=LU177_LAMBDA_S, duration_s=900.0)
    assert float(v[0]) == 1000.0
    with pytest.raises(NMValueError, match="calibration"):
        to_bqml_at_start(a, "CNTS", "NONE", voxel_ml=1.0, decay_constant_per_s=LU177_LAMBDA_S, duration_s=900.0)
    with pytest.raises(NMValueError, match="duration"):
        to_bqml_at_start(a, "CNTS", "NONE", voxel_ml=1.0, decay_constant_per_s=LU177_LAMBDA_S,
                         calibration_cps_per_mbq=9.6)


def test_acquisition_duration_sources():
    ds = Dataset()
    r1, r2 = Dataset(), Dataset()
    r1.ActualFrameDuration, r1.NumberOfFramesInRotation = 20000, 30
    r2.ActualFrameDuration, r2.NumberOfFramesInRotation = 25000, 30
    ds.RotationInformationSequence = Sequence([r1, r2])
    assert acquisition_duration_s(ds) == (1350.0, "header: RotationInformationSequence ActualFrameDuration × "
                                                  "NumberOfFramesInRotation")
    sg = Dataset()
    sg.ImageComments = "Q.Volumetrix$ImagingDuration$1200000$"
    assert acquisition_duration_s(sg) == (1200.0, "header: ImageComments $ImagingDuration$")
    assert acquisition_duration_s(Dataset()) is None


# ------------------------------------------------------------------- a real generated SPECT, re-encoded

def _bundled_nm(root: Path) -> Path:
    for p in sorted((root / "test_data" / "P03" / "DICOM").rglob("IM*")):
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        if ds.Modality == "NM":
            return p
    raise AssertionError("no NM file in P03")


def reencode(src: Path, dst: Path, style: str) -> Path:
    """Rewrite a bundled counts NM file the way another console would store the same reconstruction."""
    ds = pydicom.dcmread(src)
    counts = ds.pixel_array.astype(np.float64)
    cal = 9.6  # the bundled cohort's camera calibration (patients.tsv)
    duration, _ = acquisition_duration_s(ds)
    vml = float(ds.PixelSpacing[0]) * float(ds.PixelSpacing[1]) * abs(float(ds.SpacingBetweenSlices)) / 1000.0
    bqml = counts / (cal * duration) * 1e6 / vml  # mean over the acquisition, as the counts are
    if style in ("counts_scaled", "hermes_counts"):
        slope = float(f"{counts.max() / 60000.0:.8g}")
        q = np.rint(counts / slope)
        if style == "counts_scaled":
            ds.RescaleSlope, ds.RescaleIntercept, ds.Units = f"{slope:.10g}", "0", "CNTS"
        else:
            ds.RealWorldValueMappingSequence = Sequence([_rwv(slope, code="{counts}", meaning="Counts")])
    else:
        slope = float(f"{bqml.max() / 60000.0:.8g}")
        q = np.rint(bqml / slope)
        if style in ("bqml_rescale", "xspect"):
            ds.RescaleSlope, ds.RescaleIntercept, ds.Units = f"{slope:.10g}", "0", "BQML"
        if style in ("bqml_rwv", "xspect"):
            ds.RealWorldValueMappingSequence = Sequence([_rwv(slope)])
    ds.PixelData = np.ascontiguousarray(q.astype(np.uint16)).tobytes()
    ds.save_as(dst, enforce_file_format=True)
    return dst


@pytest.mark.parametrize("style", ["counts_scaled", "hermes_counts", "bqml_rwv", "bqml_rescale", "xspect"])
def test_vendor_storage_of_one_reconstruction_gives_the_same_bqml(root, tmp_path, style):
    """The same 177Lu reconstruction stored five ways gives the same Bq/mL at acquisition start: voxelwise
    within the 16-bit quantisation (1/60000 of the maximum) and the total activity within 0.01 %."""
    src = _bundled_nm(root)
    base = read_nm(src)
    ds = pydicom.dcmread(src, stop_before_pixels=True)
    duration, _ = acquisition_duration_s(ds)
    common = {"voxel_ml": float(np.prod(base.image.GetSpacing())) / 1000.0, "decay_constant_per_s": LU177_LAMBDA_S,
              "calibration_cps_per_mbq": 9.6, "duration_s": duration}
    ref, _ = to_bqml_at_start(_values(base), base.units, base.decay_correction, **common)
    nm = read_nm(reencode(src, tmp_path / f"{style}.dcm", style))
    got, _ = to_bqml_at_start(_values(nm), nm.units, nm.decay_correction, **common)
    assert nm.units == ("CNTS" if style in ("counts_scaled", "hermes_counts") else "BQML")
    np.testing.assert_allclose(got, ref, rtol=0, atol=float(ref.max()) / 60000.0)
    assert got.sum() == pytest.approx(ref.sum(), rel=1e-4)
