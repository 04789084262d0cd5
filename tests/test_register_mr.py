"""MR → reference CT and emission → own-CT registration (different frames of reference), against truth.

- P03 (bundled) has an MR in its own pose and frame with an RTSTRUCT of the target lesions drawn on
  it; it is ingested and registered once for all stage tests (``processed_cohort`` in conftest).
- An emission-own-frame patient is generated here (tiny, one SPECT time point, 3 lesions): every
  PET/SPECT has its own FrameOfReferenceUID and a rigid offset (30 mm, up to 4°) from its CT; truth
  ``sessions.{id}.emission.session_to_reference`` maps its scanner frame to the reference frame.

Truth of a lesion centre c (reference frame) in a frame whose ``session_to_reference`` is M: M⁻¹ c.
Numbers are printed (``-s``).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from conftest import TEST_DATA, load_truth
from prrtquant.geometry import Grid, Rigid
from prrtquant.stages.ingest import PatientSheet, ingest
from prrtquant.phantom.generator import PhantomOptions, generate_patient, patient_anatomy
from prrtquant.stages.register import register_patient
from prrtquant.registration import (
    RegistrationSettings,
    compose,
    dice,
    propagate_mask,
    read_transform,
    register_mr_to_ct,
)


def _inv_apply(m, c) -> np.ndarray:
    mi = np.linalg.inv(np.asarray(m, dtype=float))
    return mi[:3, :3] @ np.asarray(c, dtype=float) + mi[:3, 3]


def _apply(m, c) -> np.ndarray:
    m = np.asarray(m, dtype=float)
    return m[:3, :3] @ np.asarray(c, dtype=float) + m[:3, 3]


def _matrix_transform(m) -> sitk.AffineTransform:
    t = sitk.AffineTransform(3)
    t.SetMatrix([float(v) for v in np.asarray(m)[:3, :3].ravel()])
    t.SetTranslation([float(v) for v in np.asarray(m)[:3, 3]])
    return t


def _pose(p: dict) -> Rigid:
    return Rigid(tuple(p["angles_deg"]), tuple(p["translation_mm"]), tuple(p["center_mm"]))


def _anatomy(truth: dict):
    g = truth["generator"]
    o = g["options"]
    return patient_anatomy(PhantomOptions(design=g["design"], size=g["size"], seed=g["seed"],
                                          n_lesions=o["n_lesions"], n_extrahepatic=o["n_extrahepatic"]))


# ----------------------------------------------------------------------------- MR (P03)

@pytest.fixture(scope="module")
def p03(processed_cohort):
    """P03 ingested and registered with default settings (once for all stage tests, see conftest)."""
    d = processed_cohort["P03"]
    return {"dir": d, "truth": load_truth("P03"), "summary": json.loads((d / "register" / "qc.json").read_text())}


def test_mr_to_reference_tre_and_qc(p03):
    """Saved reference→MR map: TRE <= 2 mm at every lesion centre; QC passes; fusion PNG and cross-check written."""
    d, truth = p03["dir"], p03["truth"]
    qc = json.loads((d / "register" / "qc.json").read_text())
    mr = qc["sessions"]["mr"]
    tr = read_transform(d / "register" / "transforms" / "reference_to_mr.tfm")
    back = read_transform(d / "register" / "transforms" / "mr_to_reference.tfm")
    m = truth["sessions"]["mr"]["session_to_reference"]
    tre = {les: float(np.linalg.norm(np.asarray(tr.TransformPoint(info["center_mm"])) - _inv_apply(m, info["center_mm"])))
           for les, info in truth["lesions"].items()}
    print(f"P03 MR->CT TRE {np.round(list(tre.values()), 2)} mm, MI {mr['metric']:.3f}, "
          f"IC {mr['inverse_consistency_mm']:.2f} mm, body Dice {mr['body_dice']:.3f}, "
          f"MR-vs-CT lesion Dice {({k: round(v, 3) for k, v in mr['lesion_dice_vs_ct'].items()})}")
    assert max(tre.values()) <= 2.0, tre
    assert mr["passed"] and not qc["flagged"], mr["reasons"]
    for info in truth["lesions"].values():
        np.testing.assert_allclose(back.TransformPoint(tr.TransformPoint(info["center_mm"])), info["center_mm"],
                                   atol=1e-6)
    assert set(mr["lesion_dice_vs_ct"]) == set(truth["lesions"])
    assert min(mr["lesion_dice_vs_ct"].values()) >= 0.6  # two drawings, two 5-6 mm grids, one registration
    assert (d / "register" / "qc" / "mr_mr_fusion.png").stat().st_size > 5000


def test_mr_masks_on_pet_grids_match_truth(p03):
    """``mr_lesion_N`` on each PET grid vs the exact sphere in that session's pose.

    Dice >= 0.85, or, where even the true MR→session map cannot reach it (a 9 mm lesion is ~15
    voxels of 6 mm, drawn on 5.5×5.5×6 mm MR voxels), within max(0.03, one voxel) of that ceiling;
    all lesions pooled >= min(0.85, ceiling - 0.03). The reference CT grid also gets the MR masks.
    """
    d, truth = p03["dir"], p03["truth"]
    anat = _anatomy(truth)
    masks = pd.read_csv(d / "register" / "masks.tsv", sep="\t")
    m_mr = np.asarray(truth["sessions"]["mr"]["session_to_reference"])
    on_ref = masks[(masks.session == "pet_iv") & (masks.image_role == "ct")]
    assert set(on_ref.roi) == {f"mr_{les}" for les in truth["lesions"]}
    assert set(masks[masks.roi.str.startswith("mr_")].mask_session) == {"mr"}
    for sid in ("pet_iv", "pet_ia"):
        st = truth["sessions"][sid]
        em = sitk.ReadImage(str(d / "ingest" / sid / "pet.nii.gz"))
        labels = anat.label_grid(Grid.of(em), _pose(st["pose"]))
        # true emission -> MR map: session -> reference -> MR
        t_true = _matrix_transform(np.linalg.inv(m_mr) @ np.asarray(st["session_to_reference"]))
        union = {k: np.zeros(labels.shape, dtype=bool) for k in ("exact", "ours", "true")}
        row = []
        for les in truth["lesions"]:
            r = masks[(masks.session == sid) & (masks.roi == f"mr_{les}") & (masks.kind == "binary")
                      & (masks.image_role == "pet")].iloc[0]
            ours = sitk.GetArrayFromImage(sitk.ReadImage(str(d / "register" / r.path))).astype(bool)
            drawn = sitk.ReadImage(str(d / "ingest" / "mr" / "masks" / "rtstruct" / f"{les}.nii.gz"))
            true_m = sitk.GetArrayFromImage(propagate_mask(drawn, t_true, em)).astype(bool)
            exact = anat.roi_mask(labels, les)
            dv, ceiling = dice(exact, ours), dice(exact, true_m)
            row.append(f"{les} {dv:.3f}/{ceiling:.3f}")
            one_voxel = 2.0 / (exact.sum() + ours.sum())
            assert dv >= min(0.85, ceiling - max(0.03, one_voxel)), (sid, les, dv, ceiling)
            for k, m in (("exact", exact), ("ours", ours), ("true", true_m)):
                union[k] |= m
        pooled, pooled_ceiling = dice(union["exact"], union["ours"]), dice(union["exact"], union["true"])
        print(f"P03 {sid} MR lesion Dice ours/true-map: " + ", ".join(row)
              + f", pooled {pooled:.3f}/{pooled_ceiling:.3f}")
        assert pooled >= min(0.85, pooled_ceiling - 0.03), (sid, pooled, pooled_ceiling)
    # quantification's rows are untouched: CT-drawn lesions still under their own names
    assert {"lesion_1", "liver"} <= set(masks[masks.session == "pet_ia"].roi)


def test_wrong_mr_initial_transform_is_caught_by_qc(p03):
    """MR start 40° about z and 60 mm off, no multi-start: QC fails and says why."""
    d, truth = p03["dir"], p03["truth"]
    ct = sitk.ReadImage(str(d / "ingest" / "pet_iv" / "ct.nii.gz"))
    mr = sitk.ReadImage(str(d / "ingest" / "mr" / "mr.nii.gz"))
    wrong = sitk.Euler3DTransform()
    wrong.SetCenter((0.0, 5.0, 0.0))
    wrong.SetRotation(0.0, 0.0, math.radians(40.0))
    wrong.SetTranslation((60.0, 0.0, 0.0))
    # no Powell polish, no backward registration: the metric and the body outline must catch it alone
    r = register_mr_to_ct(ct, mr, RegistrationSettings(multi_start=False, multimodal_polish=False,
                                                       check_inverse_consistency=False), initial=wrong)
    m = truth["sessions"]["mr"]["session_to_reference"]
    tre = [float(np.linalg.norm(np.asarray(r.transform.TransformPoint(i["center_mm"])) - _inv_apply(m, i["center_mm"])))
           for i in truth["lesions"].values()]
    print(f"wrong MR start: TRE max {max(tre):.1f} mm, MI {r.metric:.3f}, IC {r.inverse_consistency_mm:.1f} mm, "
          f"body Dice {r.body_dice:.3f}, reasons {r.reasons}")
    assert max(tre) > 2.0
    assert not r.passed and r.reasons
    assert any("Mattes" in x for x in r.reasons) and any("Dice" in x for x in r.reasons)
    json.dumps(r.qc_dict())


# ----------------------------------------------------------------------------- emission with its own frame

@pytest.fixture(scope="module")
def own_frame(tmp_path_factory):
    d = tmp_path_factory.mktemp("own_frame")
    truth = generate_patient(d / "P", seed=11, n_lesions=3, emission_own_frame=True,
                             spect_time_points=((24.0,),), pseudonym="OWN")
    sheet = json.loads((d / "P" / "sheet.json").read_text())
    ingest(d / "P" / "DICOM", d / "ingest",
           PatientSheet(patient="OWN", design=sheet["design"],
                        ia_pet_study_instance_uid=sheet["ia_pet_study_instance_uid"],
                        camera_cps_per_mbq=sheet["camera_cps_per_mbq"]))
    summary = register_patient(d / "ingest", d / "register", RegistrationSettings(), fractional=False)
    return {"dir": d, "truth": truth, "summary": summary}


def test_emission_own_frame_phantom_truth(own_frame):
    """Every emission has its own frame UID; truth's emission map = session map ∘ emission→CT offset."""
    truth = own_frame["truth"]
    assert truth["generator"]["options"]["emission_own_frame"] is True
    for sid, st in truth["sessions"].items():
        e = st["emission"]
        assert e["frame_of_reference_uid"] != st["frame_of_reference_uid"]
        np.testing.assert_allclose(np.asarray(e["session_to_reference"]),
                                   np.asarray(st["session_to_reference"]) @ np.asarray(e["emission_to_ct"]),
                                   atol=1e-9)
        offset = np.linalg.norm(np.asarray(e["emission_to_ct"])[:3, 3])
        assert offset > 5.0, sid


def test_emission_own_frame_registered_not_raised(own_frame):
    """The stage registers each emission to its CT: TRE of the emission→reference chain <= 2 mm (PET), <= 3 mm (SPECT)."""
    d, truth = own_frame["dir"], own_frame["truth"]
    qc = json.loads((d / "register" / "qc.json").read_text())
    anat = _anatomy(truth)
    for sid, st in truth["sessions"].items():
        e = qc["sessions"][sid]["emission"]
        e2ct = read_transform(d / "register" / "transforms" / f"{sid}_emission_to_ct.tfm")
        s2r = (None if st["is_reference"]
               else read_transform(d / "register" / "transforms" / f"{sid}_to_reference.tfm"))
        chain = compose(e2ct, s2r)
        m_e = st["emission"]["session_to_reference"]
        tre = [float(np.linalg.norm(np.asarray(chain.TransformPoint(_inv_apply(m_e, i["center_mm"]).tolist()))
                                    - np.asarray(i["center_mm"]))) for i in truth["lesions"].values()]
        # liver mask on the emission grid vs the exact liver in the emission's pose
        role = "pet" if st["kind"] == "PET" else "spect"
        em = sitk.ReadImage(str(d / "ingest" / sid / f"{role}.nii.gz"))
        exact = anat.roi_mask(anat.label_grid(Grid.of(em), _pose(st["emission"]["pose"])), "liver")
        masks = pd.read_csv(d / "register" / "masks.tsv", sep="\t")
        r = masks[(masks.session == sid) & (masks.roi == "liver") & (masks.kind == "binary")].iloc[0]
        liver = sitk.GetArrayFromImage(sitk.ReadImage(str(d / "register" / r.path))).astype(bool)
        dl = dice(exact, liver)
        print(f"own frame {sid:13s} emission->reference TRE {np.round(tre, 2)} mm; emission->CT MI {e['metric']:.3f} "
              f"IC {e['inverse_consistency_mm']:.2f} mm body Dice {e['body_dice']:.3f} passed={e['passed']}; "
              f"liver Dice {dl:.3f}")
        assert max(tre) <= (2.0 if st["kind"] == "PET" else 3.0), (sid, tre)
        assert e["passed"], (sid, e["reasons"])
        assert dl >= 0.95, (sid, dl)
    assert not qc["flagged"], qc["failed_sessions"]
