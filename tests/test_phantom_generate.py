"""The generator: determinism, the bundled cohort's recipe, options and failure behaviour."""

from __future__ import annotations

import json
import math
import shlex
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import COHORT, TEST_DATA, load_truth, series_files
from prrtquant.cli import main


def _close(a, b, path="") -> list[str]:
    """Differences between two JSON values (floats to 1e-9 relative)."""
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{path}: keys {sorted(set(a) ^ set(b))}"]
        return [d for k in a for d in _close(a[k], b[k], f"{path}.{k}")]
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: length {len(a)} != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _close(x, y, f"{path}[{i}]")]
    if isinstance(a, float) and isinstance(b, float):
        if math.isnan(a) and math.isnan(b):
            return []
        return [] if math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12) else [f"{path}: {a} != {b}"]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def _recipe(patient: str) -> list[str]:
    """The exact `prrtquant phantom` arguments of one patient in test_data/make_cohort.sh."""
    text = (TEST_DATA / "make_cohort.sh").read_text().replace("\\\n", " ")
    for line in text.splitlines():
        words = shlex.split(line)
        if len(words) > 2 and words[1] == "phantom" and words[words.index("--out") + 1] == patient:
            return words[2:]
    raise AssertionError(f"{patient} not in make_cohort.sh")


def test_regenerating_the_bundled_cohort_gives_identical_truth(tmp_path):
    args = _recipe("P01")
    args[args.index("--out") + 1] = str(tmp_path / "P01")
    assert main(["phantom", *args]) == 0
    new = json.loads((tmp_path / "P01" / "truth.json").read_text())
    diffs = _close(load_truth("P01"), new)
    assert not diffs, diffs[:10]


def test_cohort_covers_the_designs_and_both_sides_of_the_threshold():
    t = {p: load_truth(p) for p in COHORT}
    wl = [x for x in t.values() if x["design"] == "whole_liver_ia"]
    assert any(x["enhancement_ratio"]["true_patient"]["eligible"] for x in wl)
    assert any(not x["enhancement_ratio"]["true_patient"]["eligible"] for x in wl)
    assert any(x["design"] == "lobar_ia" for x in t.values())
    total = sum(f.stat().st_size for f in TEST_DATA.rglob("*") if f.is_file())
    assert total <= 20 * 1024 * 1024, f"test_data is {total / 2**20:.1f} MiB"


def test_truth_is_consistent_with_its_own_definitions():
    t = load_truth("P01")
    er = t["enhancement_ratio"]
    assert er["true_patient"]["mean"] == pytest.approx(4.0, rel=1e-12)  # --mean-er 4.0
    for les in er["target_lesions"]:
        assert er["true"][les] == pytest.approx(t["suv_true"]["IA"][les] / t["suv_true"]["IV"][les])
        ref = er["reference_measured"][les]
        iv, ia = t["sessions"]["pet_iv"]["reference_measured"][les], t["sessions"]["pet_ia"]["reference_measured"][les]
        assert ref["er_mean"] == pytest.approx(ia["suvmean"] / iv["suvmean"])
        # partial volume: the blurred lesion's measured ER lies between healthy liver's and the true ER
        assert 1.3 * 0.9 < ref["er_mean"] < er["true"][les]
    # TIA of a lesion = volume x analytic integral of its kinetics
    lam = math.log(2) / (6.647 * 24)
    cyc = t["cycles"]["1"]
    k = cyc["kinetics"]["lesion_1"]
    dens = cyc["injected_activity_bq"] / (t["patient"]["weight_kg"] * 1000) * k["S"] * (
        1 / (k["kw_per_h"] + lam) - 1 / (k["ku_per_h"] + lam))
    assert cyc["tia_mbq_h"]["lesion_1"] == pytest.approx(dens * t["volumes_ml"]["lesion_1"] / 1e6, rel=1e-9)
    assert t["volumes_ml"]["lesion_1"] == pytest.approx(4 / 3 * math.pi * t["lesions"]["lesion_1"]["radius_mm"] ** 3 / 1000)
    # the liver is the sum of its lobes
    v = t["volumes_ml"]
    assert v["liver"] == pytest.approx(v["liver_left"] + v["liver_right"], rel=1e-12)


def test_lobar_truth_has_treated_and_control_tn():
    t = load_truth("P03")
    assert t["design"] == "lobar_ia" and t["treated_lobe"] == "right"
    row = t["tn"]["spect_c1_24h"]
    assert row["right"]["tn_reference"] > 1 and row["left"]["tn_reference"] > 1
    assert row["treated_over_control_reference"] == pytest.approx(
        row["right"]["tn_reference"] / row["left"]["tn_reference"])
    enhanced = [l for l, v in t["lesions"].items() if v["ia_enhanced"]]
    assert enhanced and all(t["lesions"][l]["lobe"] == "right" for l in enhanced)


def test_messy_names_and_mr_session():
    t2 = load_truth("P02")
    names = t2["sessions"]["pet_iv"]["masks"]["roi_names"]
    assert names["liver_right"] == "Rt lobe" and names["lesion_1"] == "Target 1" and names["kidney_left"] == "Kidney L"
    t3 = load_truth("P03")
    assert "mr" in t3["sessions"] and t3["sessions"]["mr"]["rtstruct"]["rois"] == sorted(t3["lesions"])


def test_other_layouts_spect_formats_noise_and_deformation(tmp_path):
    """Same seed twice: A noise free, NM in Bq/mL, flat layout; B with noise, SPECT exported as PET."""
    import pydicom

    from prrtquant.dicom.spect import read_nm

    common = ["--seed", "5", "--n-lesions", "2", "--n-extrahepatic", "1", "--deformation", "--spect-time-points", "24"]
    assert main(["phantom", "--out", str(tmp_path / "a"), *common, "--layout", "flat", "--spect-format", "nm_bqml"]) == 0
    assert main(["phantom", "--out", str(tmp_path / "b"), *common, "--spect-format", "pt_bqml", "--noise", "0.1"]) == 0
    a, b = (json.loads((tmp_path / x / "truth.json").read_text()) for x in "ab")
    files = list((tmp_path / "a" / "DICOM").iterdir())
    assert all(p.is_file() for p in files) and (tmp_path / "a" / "DICOM" / "README.txt").exists()  # flat
    sa, sb = series_files(tmp_path / "a" / "DICOM"), series_files(tmp_path / "b" / "DICOM")
    st_a, st_b = a["sessions"]["spect_c1_24h"], b["sessions"]["spect_c1_24h"]
    assert read_nm(sa[st_a["spect"]["series_instance_uid"]][0]).units == "BQML"
    ds = pydicom.dcmread(sb[st_b["spect"]["series_instance_uid"]][0], stop_before_pixels=True)
    assert ds.Modality == "PT" and ds.Units == "BQML" and ds.DecayCorrection == "NONE"
    assert st_a["deformation"] is not None and a["sessions"]["pet_iv"]["deformation"] is None
    # noise: the mean of the healthy liver is kept (to 1%), its maximum rises
    ha = a["sessions"]["pet_iv"]["reference_measured"]["healthy_liver"]
    hb = b["sessions"]["pet_iv"]["reference_measured"]["healthy_liver"]
    assert hb["suvmean"] == pytest.approx(ha["suvmean"], rel=0.01)
    assert hb["suvmax"] > 1.05 * ha["suvmax"]
    # everything but the noise is the same patient
    assert a["enhancement_ratio"]["true"] == b["enhancement_ratio"]["true"]


def test_existing_output_is_refused_and_nothing_half_written(tmp_path, capsys):
    out = tmp_path / "p"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert main(["phantom", "--out", str(out), "--seed", "1"]) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "not empty" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_failure_midway_leaves_nothing(tmp_path, monkeypatch):
    from prrtquant.phantom import generator

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(generator, "write_seg", boom)
    with pytest.raises(RuntimeError):
        generator.generate_patient(tmp_path / "p", seed=1, n_lesions=2)
    assert list(tmp_path.iterdir()) == []


def test_console_script_runs(tmp_path):
    exe = Path(__import__("sys").executable).parent / "prrtquant"
    r = subprocess.run([str(exe), "phantom", "--help"], capture_output=True, text=True, check=True)
    assert "--design" in r.stdout and "whole_liver_ia" in r.stdout


def test_ct_slice_option_and_small_size_keep_the_field_of_view():
    """``ct_slice_mm`` changes the CT's slice spacing only (same axial extent); ``small`` covers the tiny field
    of view at clinical voxel sizes; nonsense is refused."""
    from prrtquant.phantom.generator import SIZES, PhantomOptions, _size_spec

    def extent(shape):
        (n, sp) = shape
        return np.asarray([(a - 1) * b for a, b in zip(n, sp)])

    thin = _size_spec(PhantomOptions(ct_slice_mm=2.0))
    assert thin.ct[1] == (5.0, 5.0, 2.0) and thin.ct[0][:2] == SIZES["tiny"].ct[0][:2]
    np.testing.assert_allclose(extent(thin.ct), extent(SIZES["tiny"].ct))
    assert thin.pet == SIZES["tiny"].pet and thin.spect == SIZES["tiny"].spect
    assert _size_spec(PhantomOptions()) is SIZES["tiny"]
    for kind in ("ct", "pet", "spect"):
        np.testing.assert_allclose(extent(getattr(SIZES["small"], kind)), extent(getattr(SIZES["tiny"], kind)),
                                   atol=6.5)
    with pytest.raises(ValueError, match="ct_slice_mm"):
        _size_spec(PhantomOptions(ct_slice_mm=0.0))
