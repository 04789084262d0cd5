"""SUV conversion against the IBSI SUV digital reference objects and analytic cases.

The 17 DROs (from oncoray/suv_computation, CC BY 4.0; bundled in tests/data/external/ibsi_suv_dro and
unpacked by the ``ibsi_suv_dro`` fixture of conftest.py) all hold the same design:
inside ``region_1`` the body-weight SUV has max 4.00 (hot sphere), min 0.20 (cold sphere) and
median 1.00 (background), whatever the stored Units / decay correction / timing quirk
(DRO_list.csv; the manual: "All DROs are identical in terms of the design, volumes, and resulting
SUVbw values"). For Units GML/CM2ML the stored values are an SUV of the kind SUVType says (SUVlbm,
SUVibw, SUVbsa); they are converted back to SUVbw before the comparison.

The mask is the NIfTI ``mask/DRO_mask.nii.gz`` (the manual's "mask for feature extraction"),
resampled by physical position onto a grid built here from the PT headers, so neither the
axis order nor the orientation of the NIfTI file is taken on trust.
"""

from __future__ import annotations

import csv
import datetime
import math
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, PositronEmissionTomographyImageStorage

from prrtquant.dicom.pet import PetConversion, SuvError, convert_pet_series
from prrtquant.dicom.suv_norms import bsa_dubois_m2, lbm_james_kg, lbm_janmahasatian_kg

DRO_IDS = [
    "DRO_0_0", "DRO_1_0", "DRO_2_0", "DRO_2_1", "DRO_2_2", "DRO_2_3", "DRO_2_4", "DRO_2_5",
    "DRO_3_0", "DRO_3_1", "DRO_3_2", "DRO_3_3", "DRO_3_4", "DRO_4_0", "DRO_4_1", "DRO_4_2", "DRO_5_0",
]
REL_TOL = 0.005

F18_HALF_LIFE_S = 6586.2
LAMBDA_F18 = math.log(2.0) / F18_HALF_LIFE_S


def require_dro_root(dro_root: Path) -> Path:
    if not (dro_root / "DRO").is_dir():
        pytest.fail(f"IBSI SUV reference objects not found at {dro_root / 'DRO'} "
                    "(see tests/data/external/README.md)", pytrace=False)
    return dro_root


def slice_position(ds: pydicom.Dataset) -> float:
    iop = np.asarray(ds.ImageOrientationPatient, dtype=float)
    return float(np.cross(iop[:3], iop[3:]) @ np.asarray(ds.ImagePositionPatient, dtype=float))


def load_pt(dro: str, dro_root: Path) -> tuple[list[pydicom.Dataset], Path]:
    folder = require_dro_root(dro_root) / "DRO" / dro / "PT"
    files = sorted(folder.glob("*.dcm"))
    assert files, f"no PT slices in {folder}"
    datasets = sorted((pydicom.dcmread(f) for f in files), key=slice_position)
    return datasets, folder


def pt_reference_image(datasets: list[pydicom.Dataset]) -> sitk.Image:
    """An empty image whose voxel centres are those of the (sorted) PT slices."""
    iop = np.asarray(datasets[0].ImageOrientationPatient, dtype=float)
    row, col = iop[:3], iop[3:]
    normal = np.cross(row, col)
    pos = np.array([slice_position(ds) for ds in datasets])
    dz = np.diff(pos)
    assert np.allclose(dz, dz[0]) and dz[0] > 0, "PT slices are not evenly spaced"
    ps = [float(v) for v in datasets[0].PixelSpacing]  # (row spacing, column spacing)
    img = sitk.Image(int(datasets[0].Columns), int(datasets[0].Rows), len(datasets), sitk.sitkUInt8)
    img.SetSpacing((ps[1], ps[0], float(dz[0])))
    img.SetOrigin([float(v) for v in datasets[0].ImagePositionPatient])
    img.SetDirection(np.column_stack([row, col, normal]).ravel().tolist())
    return img


def region_mask(dro: str, datasets: list[pydicom.Dataset], dro_root: Path) -> np.ndarray:
    path = require_dro_root(dro_root) / "DRO" / dro / "mask" / "DRO_mask.nii.gz"
    mask = sitk.ReadImage(str(path)) > 0
    ref = pt_reference_image(datasets)
    on_pt = sitk.Resample(mask, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    out = sitk.GetArrayFromImage(on_pt).astype(bool)  # (z, y, x)
    n_mask = int(sitk.GetArrayFromImage(mask).sum())
    assert out.sum() == n_mask > 0, "mask voxels lost when placed on the PT grid (geometry mismatch)"
    return out


def expected_values(dro_root: Path) -> dict[str, tuple[float, float, float]]:
    path = require_dro_root(dro_root) / "DRO" / "DRO_list.csv"
    with open(path, newline="", encoding="utf-8") as fh:
        return {r["ID"]: (float(r["SUVmax_expected"]), float(r["SUVmin_expected"]), float(r["SUVmed_expected"]))
                for r in csv.DictReader(fh)}


def test_dro_list_matches_parametrisation(ibsi_suv_dro: Path) -> None:
    exp = expected_values(ibsi_suv_dro)
    assert sorted(exp) == sorted(DRO_IDS)
    assert set(exp.values()) == {(4.0, 0.2, 1.0)}


# DRO_2_3 (Units CM2ML) stores SUV-BSA as integers with RescaleSlope 0.01, i.e. 105, 26 and 5
# (ratio 21 : 5.2 : 1 instead of 20 : 5 : 1): the generator truncated 4.00, 1.00, 0.20 SUVbw
# times BSA/W (1.0564, 0.2641, 0.0528) to two decimals. Converted back, the true value lies in
# [stored, stored + one quantum); the quantum is 0.01 * W / BSA = 0.0379 SUVbw, larger than the
# 0.5 % tolerance, so for this object the check is "within one storage quantum below the target".
STORAGE_LIMITED = {"DRO_2_3"}


def _storage_quantum_suvbw(datasets: list[pydicom.Dataset]) -> float:
    w_g = float(datasets[0].PatientWeight) * 1000.0
    bsa_cm2 = 0.007184 * (100.0 * float(datasets[0].PatientSize)) ** 0.725 * float(datasets[0].PatientWeight) ** 0.425 * 1e4
    return max(float(ds.RescaleSlope) for ds in datasets) * w_g / bsa_cm2


@pytest.mark.parametrize("dro", DRO_IDS, ids=DRO_IDS)
def test_dro_suvbw_in_region(dro: str, ibsi_suv_dro: Path) -> None:
    datasets, folder = load_pt(dro, ibsi_suv_dro)
    conv = convert_pet_series(datasets, source=str(folder))
    assert isinstance(conv, PetConversion)
    assert conv.suvbw.shape == conv.bqml.shape == (len(datasets), datasets[0].Rows, datasets[0].Columns)
    assert conv.suvbw.dtype == np.float64
    np.testing.assert_allclose(conv.suvbw, conv.bqml * conv.suv_bw_factor)

    values = conv.suvbw[region_mask(dro, datasets, ibsi_suv_dro)]
    measured = (float(values.max()), float(values.min()), float(np.median(values)))
    expected = expected_values(ibsi_suv_dro)[dro]
    for what, m, e in zip(("max", "min", "median"), measured, expected):
        if dro in STORAGE_LIMITED:
            q = _storage_quantum_suvbw(datasets)
            assert e - q < m <= e * (1 + REL_TOL), f"{dro} SUVbw {what} {m:.4f}, expected {e} - one quantum {q:.4f}"
        else:
            assert m == pytest.approx(e, rel=REL_TOL), f"{dro} SUVbw {what} {m:.4f}, expected {e:.2f}"


@pytest.mark.parametrize(
    "dro, check",
    [
        ("DRO_3_0", lambda c: any("MBq" in n for n in c.notes) and c.injected_activity_bq == pytest.approx(368.08e6)),
        ("DRO_3_1", lambda c: c.reference_time == c.injection_time),
        ("DRO_3_2", lambda c: abs((c.reference_time - datetime.datetime(2025, 1, 1, 11, 0)).total_seconds()) < 1.0
         and any("back-computed" in n for n in c.notes)),
        ("DRO_3_3", lambda c: c.reference_time == datetime.datetime(2025, 1, 1, 11, 0)),
        ("DRO_4_2", lambda c: c.injection_time == datetime.datetime(2025, 1, 1, 23, 30)
         and c.reference_time == datetime.datetime(2025, 1, 2, 0, 30)),
        ("DRO_5_0", lambda c: c.radionuclide == "Ga-68" and c.half_life_s == pytest.approx(4057.7)),
        ("DRO_0_0", lambda c: c.radionuclide == "F-18" and c.units_in == "BQML" and c.decay_correction == "START"),
    ],
    ids=["DRO_3_0", "DRO_3_1", "DRO_3_2", "DRO_3_3", "DRO_4_2", "DRO_5_0", "DRO_0_0"],
)
def test_dro_interpretation(dro: str, check, ibsi_suv_dro: Path) -> None:
    datasets, folder = load_pt(dro, ibsi_suv_dro)
    assert check(convert_pet_series(datasets, source=str(folder)))


# ---------------------------------------------------------------------------------------------
# analytic body-size formulas (70 kg, 175 cm)
# ---------------------------------------------------------------------------------------------

def test_lbm_james() -> None:
    # (W/H)^2 = (70/175)^2 = 0.16
    assert lbm_james_kg(70.0, 1.75, "M") == pytest.approx(1.10 * 70 - 128 * 0.16)  # 56.52
    assert lbm_james_kg(70.0, 1.75, "F") == pytest.approx(1.07 * 70 - 148 * 0.16)  # 51.22
    assert lbm_james_kg(70.0, 1.75, "M") == pytest.approx(56.52)
    assert lbm_james_kg(70.0, 1.75, "F") == pytest.approx(51.22)
    assert lbm_james_kg(70.0, 1.75, "O") == pytest.approx((56.52 + 51.22) / 2)


def test_lbm_janmahasatian() -> None:
    # BMI = 70 / 1.75^2 = 160/7; male 9270*70 / (6680 + 216*160/7) = 4542300/81320
    assert lbm_janmahasatian_kg(70.0, 1.75, "M") == pytest.approx(4542300 / 81320)  # 55.857
    assert lbm_janmahasatian_kg(70.0, 1.75, "F") == pytest.approx(4542300 / 100500)  # 45.197
    assert lbm_janmahasatian_kg(70.0, 1.75, "M") == pytest.approx(55.8571, abs=1e-4)


def test_bsa_dubois() -> None:
    # 0.007184 * 175^0.725 * 70^0.425 = exp(-4.935900 + 3.744470 + 1.805610) = exp(0.614180)
    assert bsa_dubois_m2(70.0, 1.75) == pytest.approx(1.84815, rel=2e-5)
    # 100 cm, 1 kg: 0.007184 * 10^1.45
    assert bsa_dubois_m2(1.0, 1.0) == pytest.approx(0.007184 * 10 ** 1.45)


def test_body_size_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        lbm_james_kg(70.0, 1.75, "X")
    with pytest.raises(ValueError):
        bsa_dubois_m2(0.0, 1.75)


# ---------------------------------------------------------------------------------------------
# synthetic slices
# ---------------------------------------------------------------------------------------------

SERIES_UID = "1.2.826.0.1.3680043.8.498.12345"


def make_slice(values=((1000, 1000), (1000, 2000)), z: float = 0.0, **attrs) -> Dataset:
    """A 2×2 PET slice: BQML, START, 400 MBq F-18 injected at 10:00, scan 11:00, 70 kg, 175 cm, M."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = PositronEmissionTomographyImageStorage
    ds.Modality = "PT"
    ds.SeriesInstanceUID = SERIES_UID
    ds.SeriesDate = ds.AcquisitionDate = "20250101"
    ds.SeriesTime = ds.AcquisitionTime = "110000"
    ds.PatientWeight = "70"
    ds.PatientSize = "1.75"
    ds.PatientSex = "M"
    ds.Units = "BQML"
    ds.DecayCorrection = "START"
    ds.ActualFrameDuration = 300000
    ds.FrameReferenceTime = "150000"
    ds.ImagePositionPatient = [0.0, 0.0, z]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.RescaleSlope = "1"
    ds.RescaleIntercept = "0"
    rp = Dataset()
    rp.RadiopharmaceuticalStartDateTime = "20250101100000"
    rp.RadionuclideTotalDose = "400000000"
    rp.RadionuclideHalfLife = str(F18_HALF_LIFE_S)
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "C-111A1", "SRT", "^18^Fluorine"
    rp.RadionuclideCodeSequence = [code]
    ds.RadiopharmaceuticalInformationSequence = [rp]
    px = np.asarray(values, dtype=np.int16)
    ds.Rows, ds.Columns = px.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.PixelData = px.tobytes()
    for key, value in attrs.items():
        if key.startswith("rp_"):
            if value is None:
                delattr(rp, key[3:])
            else:
                setattr(rp, key[3:], value)
        elif value is None:
            delattr(ds, key)
        else:
            setattr(ds, key, value)
    return ds


def dose_at(seconds_after_injection: float, dose_bq: float = 400e6) -> float:
    return dose_bq * math.exp(-LAMBDA_F18 * seconds_after_injection)


def test_synthetic_bqml_start_analytic() -> None:
    conv = convert_pet_series([make_slice()], source="synthetic")
    assert conv.reference_time == datetime.datetime(2025, 1, 1, 11, 0)
    assert conv.injection_time == datetime.datetime(2025, 1, 1, 10, 0)
    assert conv.suv_bw_factor == pytest.approx(70000.0 / dose_at(3600.0))
    np.testing.assert_allclose(conv.bqml[0], [[1000, 1000], [1000, 2000]])
    np.testing.assert_allclose(conv.suvbw[0, 0, 0], 1000 * 70000.0 / dose_at(3600.0))
    assert conv.sul_james_factor == pytest.approx(56520.0 / dose_at(3600.0))
    assert conv.sul_janmahasatian_factor == pytest.approx(4542300 / 81320 * 1000 / dose_at(3600.0))
    assert conv.suv_bsa_factor == pytest.approx(bsa_dubois_m2(70, 1.75) * 1e4 / dose_at(3600.0))
    assert conv.radionuclide == "F-18"
    assert conv.notes == ()


def test_missing_patient_weight_raises() -> None:
    ds = make_slice(PatientWeight=None)
    with pytest.raises(SuvError, match="PatientWeight") as exc:
        convert_pet_series([ds])
    assert SERIES_UID in str(exc.value)  # names the series when no file/source is known
    with pytest.raises(SuvError, match=r"^/data/pet/slice1\.dcm: .*PatientWeight"):
        convert_pet_series([ds], source="/data/pet/slice1.dcm")


def test_weight_override_used_and_noted() -> None:
    conv = convert_pet_series([make_slice(PatientWeight=None)], weight_kg_override=80.0)
    assert conv.weight_kg == 80.0
    assert conv.suv_bw_factor == pytest.approx(80000.0 / dose_at(3600.0))
    assert any("override" in n for n in conv.notes)
    conv = convert_pet_series([make_slice()], weight_kg_override=80.0)  # override wins over header
    assert conv.suv_bw_factor == pytest.approx(80000.0 / dose_at(3600.0))
    assert any("override" in n and "70" in n for n in conv.notes)


def test_weight_in_grams() -> None:
    conv = convert_pet_series([make_slice(PatientWeight="70000")])
    assert conv.weight_kg == 70.0
    assert any("grams" in n for n in conv.notes)


def test_dose_in_mbq_noted() -> None:
    conv = convert_pet_series([make_slice(rp_RadionuclideTotalDose="400")])
    assert conv.injected_activity_bq == pytest.approx(400e6)
    assert conv.suv_bw_factor == pytest.approx(70000.0 / dose_at(3600.0))
    assert any("MBq" in n for n in conv.notes)


@pytest.mark.parametrize(
    "attrs, word",
    [
        ({"rp_RadionuclideTotalDose": None}, "RadionuclideTotalDose"),
        ({"rp_RadionuclideHalfLife": None, "rp_RadionuclideCodeSequence": None}, "RadionuclideHalfLife"),
        ({"rp_RadiopharmaceuticalStartDateTime": None}, "RadiopharmaceuticalStartTime"),
        ({"Units": "PROPCNTS"}, "Units"),
        ({"Units": None}, "Units"),
        ({"RescaleIntercept": "5"}, "RescaleIntercept"),
        ({"Units": "CNTS"}, "7053"),
        ({"Units": "GML", "SUVType": "IBW", "PatientSex": None}, "PatientSex"),
        ({"Units": "GML", "SUVType": "LBMJAMES128", "PatientSize": None}, "PatientSize"),
        ({"rp_RadionuclideTotalDose": "200000"}, "ambiguous"),
    ],
    ids=["no-dose", "no-half-life", "no-injection-time", "propcnts", "no-units", "intercept",
         "cnts-no-factor", "ibw-no-sex", "lbm-no-height", "dose-ambiguous"],
)
def test_unusable_headers_raise(attrs: dict, word: str) -> None:
    with pytest.raises(SuvError, match=word) as exc:
        convert_pet_series([make_slice(**attrs)], source="synthetic-source")
    assert str(exc.value).startswith("synthetic-source: ")


def test_half_life_from_code_sequence() -> None:
    conv = convert_pet_series([make_slice(rp_RadionuclideHalfLife=None)])
    assert conv.half_life_s == pytest.approx(F18_HALF_LIFE_S)
    assert any("RadionuclideCodeSequence" in n for n in conv.notes)


def test_philips_private_factors_as_unknown_bytes() -> None:
    # activity concentration scale factor, stored without private creator as UN bytes
    ds = make_slice(Units="CNTS")
    ds.add_new(0x70531009, "UN", b"0.5 ")
    conv = convert_pet_series([ds])
    np.testing.assert_allclose(conv.bqml[0], [[500, 500], [500, 1000]])
    # SUV scale factor only: stored * slope * f is SUVbw
    ds = make_slice(Units="CNTS")
    ds.add_new(0x70531000, "UN", b"0.001\x00")
    conv = convert_pet_series([ds])
    np.testing.assert_allclose(conv.suvbw[0], [[1.0, 1.0], [1.0, 2.0]])
    np.testing.assert_allclose(conv.bqml[0, 0, 0], dose_at(3600.0) / 70000.0)


def test_gml_lbm_back_to_suvbw() -> None:
    ds = make_slice(values=((1000, 0), (0, 0)), Units="GML", SUVType="LBMJAMES128", RescaleSlope="0.001")
    conv = convert_pet_series([ds])
    assert conv.suvbw[0, 0, 0] == pytest.approx(1.0 * 70.0 / 56.52)


def test_decay_correction_none_per_slice() -> None:
    # two slices acquired at 11:00 and 11:10 (frame 600 s), not decay corrected, 1000 Bq/mL stored
    s0 = make_slice(DecayCorrection="NONE", ActualFrameDuration=600000, z=0.0)
    s1 = make_slice(DecayCorrection="NONE", ActualFrameDuration=600000, AcquisitionTime="111000", z=4.0)
    conv = convert_pet_series([s0, s1])
    assert conv.reference_time == datetime.datetime(2025, 1, 1, 11, 0)
    x = LAMBDA_F18 * 600.0
    frame = x / (1.0 - math.exp(-x))
    assert conv.bqml[0, 0, 0] == pytest.approx(1000.0 * frame)
    assert conv.bqml[1, 0, 0] == pytest.approx(1000.0 * frame * math.exp(LAMBDA_F18 * 600.0))
    # the manual's closed form: SUV = m P W / D_adm * λT/(1-e^-λT) * e^(λ (t_acq - t_adm))
    assert conv.suvbw[1, 0, 0] == pytest.approx(1000 * 70000 / 400e6 * frame * math.exp(LAMBDA_F18 * 4200.0))


def test_injection_before_midnight_time_only() -> None:
    ds = make_slice(SeriesDate="20250102", AcquisitionDate="20250102", SeriesTime="003000", AcquisitionTime="003000",
                    rp_RadiopharmaceuticalStartDateTime=None, rp_RadiopharmaceuticalStartTime="233000")
    conv = convert_pet_series([ds])
    assert conv.injection_time == datetime.datetime(2025, 1, 1, 23, 30)
    assert conv.suv_bw_factor == pytest.approx(70000.0 / dose_at(3600.0))
    assert any("previous day" in n for n in conv.notes)
