"""The quantification accuracy target, through the whole path (ingest -> registration -> quantification), on
generated patients at clinical voxel sizes.

The target: enhancement ratio per lesion and T/N per lobe within 2 % of truth.json's reference-measured values
(the same statistic on each emission grid with the exact analytic masks). It is asserted here on patients of
the generator's ``small`` size: the tiny anatomy's field of view with a 2 mm CT, 4 mm PET and 4.42 mm SPECT
voxels. On the bundled ``tiny`` cohort (6 mm CT slices, 6 mm PET and 6.4 mm SPECT voxels) a 3 mL lesion is
~15 PET voxels and the drawn contours cannot place its caps to better than ~1 mm, so a single voxel at its edge
moves its mean by several %: tests/test_quantify_stage.py asserts what that geometry allows.

The two patients are the first lobar and the first whole-liver seed tried (31, 35); README "validated" lists
every seed measured. Each takes ~1.5 min (generation ~30 s).
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from conftest import process_generated
from prrtquant.phantom.generator import generate_patient

RTOL = 0.02  # the target
PER_LESION_TN_RTOL = 0.03  # one lesion's mean on 25-120 SPECT voxels (measured: max 2.1 % over 5 lobar patients, README)


@pytest.fixture(scope="module")
def lobar(tmp_path_factory):
    d = tmp_path_factory.mktemp("small_lobar")
    truth = generate_patient(d / "patient", design="lobar_ia", size="small", seed=31,
                             spect_time_points=((24.0,), (24.0,)))
    return truth, process_generated(d / "patient", d / "work", "LOBAR") / "quantify"


@pytest.fixture(scope="module")
def whole_liver(tmp_path_factory):
    d = tmp_path_factory.mktemp("small_whole_liver")
    truth = generate_patient(d / "patient", design="whole_liver_ia", size="small", seed=35,
                             spect_time_points=((24.0,),))
    # the enhancement ratio needs the two PET sessions only
    return truth, process_generated(d / "patient", d / "work", "WHOLE", sessions=["pet_iv", "pet_ia"]) / "quantify"


def _check_er(truth, q):
    er = truth["enhancement_ratio"]
    les = pd.read_csv(q / "lesions.tsv", sep="\t").set_index("lesion")
    assert sorted(les.index) == sorted(truth["lesions"])
    errors = {}
    for name, r in les.iterrows():
        ref = er["reference_measured"][name]
        errors[name] = (r.er_mean / ref["er_mean"] - 1.0, r.er_max / ref["er_max"] - 1.0)
    print("ER error (mean, max):", {k: tuple(round(100 * v, 2) for v in e) for k, e in errors.items()})
    assert max(abs(e) for pair in errors.values() for e in pair) < RTOL, errors
    elig = json.loads((q / "eligibility.json").read_text())
    assert elig["eligible"] == er["reference_patient_suvmax"]["eligible"] == er["true_patient"]["eligible"]
    assert elig["value"] == pytest.approx(er["reference_patient_suvmax"]["mean"], rel=RTOL)
    assert elig["flagged"] is False


def test_er_per_lesion_within_2_percent_whole_liver(whole_liver):
    _check_er(*whole_liver)


def test_er_per_lesion_within_2_percent_lobar(lobar):
    _check_er(*lobar)


def test_lobe_tn_within_2_percent(lobar):
    truth, q = lobar
    lob = pd.read_csv(q / "lobes.tsv", sep="\t")
    assert sorted(set(lob.session)) == ["spect_c1_24h", "spect_c2_24h"] and lob.endpoint.all()
    errors = {}
    for r in lob.itertuples():
        ref = truth["tn"][r.session][r.lobe]
        errors[(r.session, r.lobe)] = r.tn / ref["tn_reference"] - 1.0
        assert r.role == ("treated" if r.lobe == truth["treated_lobe"] else "control")
        assert r.tn_treated_over_control == pytest.approx(
            truth["tn"][r.session]["treated_over_control_reference"], rel=RTOL)
    print("lobe T/N error:", {k: round(100 * v, 2) for k, v in errors.items()})
    assert len(errors) == 4 and max(abs(e) for e in errors.values()) < RTOL, errors
    per = pd.read_csv(q / "lobe_lesions.tsv", sep="\t")
    per_err = np.array([r.tn / truth["tn"][r.session][r.lobe]["tn_per_lesion_reference"][r.lesion] - 1.0
                        for r in per.itertuples()])
    print("per-lesion T/N error:", np.round(100 * per_err, 2))
    assert len(per_err) == 2 * len(truth["lesions"]) and np.abs(per_err).max() < PER_LESION_TN_RTOL
