"""Quantification core against analytic answers and independent brute-force computations."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from scipy import stats
from scipy.spatial import cKDTree

from prrtquant.geometry import Grid, euler_matrix
from prrtquant.quantify import (
    QuantifyError,
    assign_lobe,
    eligibility,
    enhancement_ratios,
    healthy_liver_mask,
    lobe_tn,
    paired_lobe_comparison,
    region_stats,
    retreatment_fraction,
    sphere_radius_mm,
    sstr_positive,
    suv_peak,
    tumour_to_liver,
)
from prrtquant.quantify.suvpeak import _sphere_kernel


def centres(grid: Grid) -> np.ndarray:
    """Physical centres (z, y, x, 3) computed independently of the code under test."""
    k, j, i = np.meshgrid(*(np.arange(n) for n in grid.shape_zyx), indexing="ij")
    ijk = np.stack([i, j, k], axis=-1).reshape(-1, 3).astype(float)
    return grid.index_to_physical(ijk).reshape(*grid.shape_zyx, 3)


def on(grid: Grid, arr: np.ndarray) -> sitk.Image:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(grid.spacing)
    img.SetOrigin(grid.origin)
    img.SetDirection(grid.direction)
    return img


# --------------------------------------------------------------------------- region_stats

def test_region_stats_cube_of_three():
    g = Grid(size=(7, 7, 7), spacing=(10.0, 10.0, 10.0), origin=(-30.0, -30.0, -30.0))
    a = np.zeros(g.shape_zyx, np.float32)
    a[2:5, 2:5, 2:5] = 3.0
    m = (a > 0).astype(np.uint8)
    s = region_stats(on(g, a), on(g, m))
    assert s["mean"] == 3.0 and s["max"] == 3.0 and s["min"] == 3.0 and s["std"] == 0.0
    assert s["n_voxels"] == 27.0
    assert s["volume_ml"] == pytest.approx(27.0, rel=1e-12)  # 27 voxels of 1 mL
    assert s["integral"] == pytest.approx(81.0, rel=1e-12)
    assert s["fraction_in_fov"] == 1.0


def test_region_stats_fractional_weights_exact():
    g = Grid(size=(5, 4, 3), spacing=(10.0, 10.0, 10.0), origin=(0.0, 0.0, 0.0))
    a = np.full(g.shape_zyx, 100.0, np.float32)  # large values outside the mask must not leak in
    w = np.zeros(g.shape_zyx, np.float32)
    a[1, 1, 1], w[1, 1, 1] = 2.0, 1.0
    a[1, 2, 3], w[1, 2, 3] = 8.0, 0.5
    a[0, 0, 0], w[0, 0, 0] = 5.0, 0.25
    s = region_stats(on(g, a), on(g, w))
    wsum = 1.75
    mean = (2.0 + 4.0 + 1.25) / wsum
    assert s["mean"] == pytest.approx(mean, rel=1e-15)
    assert s["n_voxels"] == wsum and s["volume_ml"] == pytest.approx(wsum, rel=1e-12)
    assert s["max"] == 8.0 and s["min"] == 2.0
    var = (1.0 * (2 - mean) ** 2 + 0.5 * (8 - mean) ** 2 + 0.25 * (5 - mean) ** 2) / wsum
    assert s["std"] == pytest.approx(math.sqrt(var), rel=1e-12)
    # two voxels only: (2·1 + 8·0.5) / 1.5 = 4 exactly
    w[0, 0, 0] = 0.0
    assert region_stats(on(g, a), on(g, w))["mean"] == 4.0


def test_region_stats_nan_outside_fov_and_empty():
    g = Grid(size=(4, 4, 4), spacing=(2.0, 2.0, 2.0), origin=(0.0, 0.0, 0.0))
    a = np.ones(g.shape_zyx, np.float32)
    a[0] = np.nan
    m = np.zeros(g.shape_zyx, np.uint8)
    m[0:2] = 1
    s = region_stats(on(g, a), on(g, m))
    assert s["n_voxels"] == 16 and s["fraction_in_fov"] == 0.5 and s["mean"] == 1.0
    m[:] = 0
    m[0] = 1
    with pytest.raises(QuantifyError, match="field of view"):
        region_stats(on(g, a), on(g, m))
    with pytest.raises(ValueError, match="empty"):
        region_stats(on(g, a), on(g, np.zeros(g.shape_zyx, np.uint8)))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        region_stats(on(g, a), on(g, np.full(g.shape_zyx, 1.5, np.float32)))
    with pytest.raises(ValueError, match="binary"):
        region_stats(on(g, a), on(g, np.full(g.shape_zyx, 2, np.uint8)))


def test_grid_mismatch_names_both_grids():
    gi = Grid(size=(8, 9, 10), spacing=(2.0, 2.0, 3.0), origin=(-5.0, 1.0, 2.0))
    gm = Grid(size=(8, 9, 11), spacing=(2.0, 2.0, 3.0), origin=(-5.5, 1.0, 2.0))
    img = on(gi, np.ones(gi.shape_zyx, np.float32))
    mask = on(gm, np.ones(gm.shape_zyx, np.uint8))
    for f in (region_stats, suv_peak):
        with pytest.raises(ValueError) as e:
            f(img, mask)
        msg = str(e.value)
        assert "(8, 9, 10)" in msg and "(8, 9, 11)" in msg
        assert "(-5.0, 1.0, 2.0)" in msg and "(-5.5, 1.0, 2.0)" in msg
    # same size, shifted origin only
    gm2 = Grid(size=gi.size, spacing=gi.spacing, origin=(-5.0, 1.0, 2.5))
    with pytest.raises(ValueError, match=r"origin \(-5.0, 1.0, 2.5\)"):
        region_stats(img, on(gm2, np.ones(gm2.shape_zyx, np.uint8)))


# --------------------------------------------------------------------------- suv_peak

def brute_force_peak(img: sitk.Image, mask: np.ndarray, radius: float) -> tuple[float, np.ndarray]:
    g = Grid.of(img)
    pts = centres(g).reshape(-1, 3)
    vals = sitk.GetArrayFromImage(img).astype(float).reshape(-1)
    best, where = -np.inf, None
    for c in np.argwhere(mask):
        p = pts[np.ravel_multi_index(tuple(c), mask.shape)]
        inside = np.sqrt(((pts - p) ** 2).sum(axis=1)) <= radius
        v = vals[inside].mean()
        if v > best:
            best, where = v, p
    return best, where


def test_suv_peak_matches_brute_force_anisotropic_oblique():
    rot = euler_matrix((12.0, -7.0, 25.0))
    g = Grid(size=(22, 20, 16), spacing=(3.65, 3.65, 3.27), origin=(-40.0, 15.0, -30.0),
             direction=tuple(rot.reshape(-1)))
    p = centres(g)
    c0 = p[8, 10, 11]
    rng = np.random.default_rng(7)
    img_arr = np.zeros(g.shape_zyx)
    for _ in range(6):  # smooth random blobs plus a gradient
        c = c0 + rng.normal(0, 12, 3)
        s = rng.uniform(5, 12)
        img_arr += rng.uniform(1, 5) * np.exp(-((p - c) ** 2).sum(-1) / (2 * s * s))
    img_arr += 0.01 * p[..., 0]
    img = on(g, img_arr.astype(np.float32))
    # candidate region: ellipsoid around c0 that also reaches the image edge (sphere truncated there)
    q = (p - c0) / np.array([18.0, 14.0, 40.0])
    mask = (q ** 2).sum(-1) <= 1.0
    mask[0:2, 0:3, 0:3] = True
    assert 100 < mask.sum() < 1000
    r = sphere_radius_mm(1.0)
    assert r == pytest.approx(6.2035, abs=1e-4)
    val, centre = suv_peak(img, on(g, mask.astype(np.uint8)))
    ref, ref_centre = brute_force_peak(img, mask, r)
    assert val == pytest.approx(ref, rel=1e-9)
    np.testing.assert_allclose(centre, ref_centre, atol=1e-6)
    # peak at the corner of the field of view: the sphere is truncated (mean of the voxels in the image)
    hot = img_arr + 20.0 * np.exp(-((p - p[0, 1, 1]) ** 2).sum(-1) / (2 * 6.0 ** 2))
    img_hot = on(g, hot.astype(np.float32))
    val_h, centre_h = suv_peak(img_hot, on(g, mask.astype(np.uint8)))
    ref_h, ref_centre_h = brute_force_peak(img_hot, mask, r)
    assert val_h == pytest.approx(ref_h, rel=1e-9)
    np.testing.assert_allclose(centre_h, ref_centre_h, atol=1e-6)
    assert np.linalg.norm(ref_centre_h - p[0, 1, 1]) < 8.0  # really at the edge
    # a fractional mask with the same support gives the same candidates
    val_f, _ = suv_peak(img, on(g, (0.3 * mask).astype(np.float32)))
    assert val_f == pytest.approx(ref, rel=1e-9)
    # bigger sphere (2 mL) also matches
    val2, _ = suv_peak(img, on(g, mask.astype(np.uint8)), volume_ml=2.0)
    assert val2 == pytest.approx(brute_force_peak(img, mask, sphere_radius_mm(2.0))[0], rel=1e-9)


def test_suv_peak_uniform_sphere_is_exact():
    g = Grid(size=(14, 14, 12), spacing=(2.5, 2.5, 3.0), origin=(-16.25, -16.25, -16.5))
    p = centres(g)
    inside = np.sqrt((p ** 2).sum(-1)) <= 12.0  # 7.2 mL sphere, far bigger than 1 mL
    a = np.where(inside, 5.0, 0.0).astype(np.float32)
    img = on(g, a)
    val, centre = suv_peak(img, on(g, inside.astype(np.uint8)))
    assert val == 5.0
    # many centres tie at exactly 5: the first in (z, y, x) order is reported, like the brute force
    ref, ref_centre = brute_force_peak(img, inside, sphere_radius_mm(1.0))
    assert ref == 5.0
    np.testing.assert_allclose(centre, ref_centre, atol=1e-9)


def test_sphere_kernel_counts_and_partial_weights():
    g = Grid(size=(5, 5, 5), spacing=(3.65, 3.65, 3.27), origin=(0.0, 0.0, 0.0))
    img = g.image()
    r = sphere_radius_mm(1.0)
    k = _sphere_kernel(img, r)
    h = np.asarray(k.shape) // 2
    off = (np.argwhere(np.ones(k.shape)) - h)[:, ::-1] * np.asarray(g.spacing)
    assert k.sum() == (np.sqrt((off ** 2).sum(1)) <= r).sum()
    kp = _sphere_kernel(img, r, subsamples=9)
    assert kp.sum() * g.voxel_volume_ml == pytest.approx(1.0, rel=0.02)
    # partial-voxel weights on a uniform image still give the uniform value
    a = np.full(g.shape_zyx, 2.5, np.float32)
    m = np.zeros(g.shape_zyx, np.uint8)
    m[2, 2, 2] = 1
    assert suv_peak(on(g, a), on(g, m), subsamples=5)[0] == pytest.approx(2.5, rel=1e-12)


# --------------------------------------------------------------------------- enhancement ratio / eligibility

def _stats(mean, mx, peak=None):
    d = {"suvmean": mean, "suvmax": mx}
    if peak is not None:
        d["suvpeak"] = peak
    return d


def test_enhancement_ratios_and_eligibility_at_threshold():
    iv = {f"lesion_{i}": _stats(2.0, 4.0, 3.0) for i in range(1, 4)}
    ia = {"lesion_1": _stats(5.0, 12.0, 9.0), "lesion_2": _stats(7.0, 14.0, 9.0),
          "lesion_3": _stats(6.0, 10.0, 9.0)}
    er = enhancement_ratios(ia, iv)
    assert list(er.index) == ["lesion_1", "lesion_2", "lesion_3"]
    assert er["er_mean"].tolist() == [2.5, 3.5, 3.0]
    assert er["er_max"].tolist() == [3.0, 3.5, 2.5]
    assert er["er_peak"].tolist() == [3.0, 3.0, 3.0]
    e = eligibility(er, "er_mean")
    assert e["value"] == 3.0 and e["eligible"] is True and e["n_lesions"] == 3 and e["flagged"] is False
    assert eligibility(er, "er_max")["value"] == 3.0
    # decimal mean exactly 3.0 although left-to-right float summation gives 2.9999999999999996
    er3 = pd.DataFrame({"er_mean": [2.7, 2.9, 3.3, 3.1]}, index=["a", "b", "c", "d"])
    assert sum(er3["er_mean"].tolist()) / 4 < 3.0
    e3 = eligibility(er3, "er_mean")
    assert e3["value"] == 3.0 and e3["eligible"] is True
    # 2.999: not eligible
    er2 = pd.DataFrame({"er_mean": [2.999, 2.999, 2.999], "er_max": [4.0, 4.0, 4.0]},
                       index=pd.Index(["a", "b", "c"], name="lesion"))
    e2 = eligibility(er2, "er_mean")
    assert e2["value"] == pytest.approx(2.999) and e2["eligible"] is False
    e2max = eligibility(er2, "er_max")  # statistic switch
    assert e2max["statistic"] == "er_max" and e2max["value"] == 4.0 and e2max["eligible"] is True
    assert eligibility(er, "er_peak")["value"] == 3.0


def test_eligibility_max_lesions_qc_and_missing():
    er = pd.DataFrame({"er_mean": [4.0, 4.0, 4.0, 4.0, 4.0, 0.0, 0.0], "er_max": [1.0] * 7},
                      index=[f"l{i}" for i in range(7)])
    e = eligibility(er, "er_mean")  # first five: mean 4
    assert e["n_lesions"] == 5 and e["value"] == 4.0 and e["lesions"] == [f"l{i}" for i in range(5)]
    e3 = eligibility(er, "er_mean", max_lesions=7)
    assert e3["value"] == pytest.approx(20.0 / 7) and e3["eligible"] is False
    # explicit target lesions and QC flags
    e4 = eligibility(er, "er_mean", lesions=["l5", "l0", "l1"], qc_flags=["ia_catheter_position"])
    assert e4["value"] == pytest.approx(8.0 / 3) and e4["eligible"] is False
    assert e4["flagged"] is True and e4["qc_flags"] == ["ia_catheter_position"]
    assert eligibility(er, "er_mean", threshold=4.0, qc_flags=["x"])["eligible"] is True
    # a lesion missing on the IV scan: NaN ratio, excluded and flagged
    ern = enhancement_ratios({"a": _stats(6.0, 9.0), "b": _stats(3.0, 3.0)}, {"a": _stats(2.0, 3.0)})
    assert math.isnan(ern.at["b", "er_mean"]) and math.isnan(ern.at["a", "er_peak"])
    en = eligibility(ern, "er_mean")
    assert en["value"] == 3.0 and en["eligible"] is True and en["excluded_lesions"] == ["b"]
    assert en["flagged"] is True and "non_finite_er:b" in en["qc_flags"]
    with pytest.raises(ValueError):
        eligibility(er, "er_median")


# --------------------------------------------------------------------------- tumour to liver, ReLUTH

def test_tumour_to_liver_and_retreatment_rule():
    assert tumour_to_liver({"mean": 12.0, "max": 20.0}, {"mean": 6.0}) == 2.0
    assert tumour_to_liver({"mean": 12.0, "max": 20.0}, {"mean": 8.0}, lesion_key="max") == 2.5
    assert tumour_to_liver(3.0, 3.0) == 1.0 and sstr_positive(1.0) is True and sstr_positive(0.999) is False
    with pytest.raises(ValueError):
        tumour_to_liver(3.0, 0.0)
    tlr = {f"lesion_{i}": v for i, v in enumerate([1.0, 2.3, 1.5, 4.0, 1.01, 3.3, 1.2, 5.0, 2.0, 0.8])}
    r = retreatment_fraction(tlr)
    assert r["n_lesions"] == 10 and r["n_positive"] == 9 and r["fraction"] == 0.9 and r["meets_rule"] is True
    assert r["negative_lesions"] == ["lesion_9"]
    tlr["lesion_0"] = 0.99
    r2 = retreatment_fraction(tlr)
    assert r2["fraction"] == 0.8 and r2["meets_rule"] is False


# --------------------------------------------------------------------------- lobar T/N

def test_lobe_tn_union_weighted_and_empty_lobe():
    means = {"l1": 100.0, "l2": 40.0, "l3": 30.0}
    vox = {"l1": 10.0, "l2": 30.0, "l3": 5.0}
    lobe = {"l1": "right", "l2": "right", "l3": "left"}
    res = lobe_tn(means, vox, lobe, {"left": 10.0, "right": 5.0}, treated_lobe="right")
    right, left = res["lobes"]["right"], res["lobes"]["left"]
    assert right["t"] == (100 * 10 + 40 * 30) / 40.0 == 55.0  # not the plain mean 70
    assert right["tn"] == 11.0 and right["tn_per_lesion"] == {"l1": 20.0, "l2": 8.0}
    assert left["tn"] == 3.0
    assert res["control_lobe"] == "left" and res["treated_over_control"] == pytest.approx(11.0 / 3.0)
    # a lobe without lesions
    res2 = lobe_tn({"l1": 100.0}, {"l1": 10.0}, {"l1": "right"}, {"left": 10.0, "right": 5.0}, "left")
    assert res2["lobes"]["left"]["t"] is None and res2["lobes"]["left"]["tn"] is None
    assert "no lesions" in res2["lobes"]["left"]["note"]
    assert res2["treated_over_control"] is None and res2["notes"]
    assert lobe_tn(means, vox, lobe, {"left": 10.0, "right": 5.0}, None)["treated_over_control"] is None


def test_healthy_liver_mask_margin_in_mm():
    g = Grid(size=(50, 50, 50), spacing=(1.0, 1.0, 1.0), origin=(-24.5, -24.5, -24.5))
    p = centres(g)
    c = np.array([0.5, -0.5, 0.5])  # on a voxel centre
    d = np.sqrt(((p - c) ** 2).sum(-1))
    liver = on(g, np.ones(g.shape_zyx, np.uint8))
    lesion_arr = d <= 10.0
    lesion = on(g, lesion_arr.astype(np.uint8))
    h0 = sitk.GetArrayFromImage(healthy_liver_mask(liver, [lesion], 0.0))
    assert (h0 == 0).sum() == lesion_arr.sum() and ((h0 == 0) == lesion_arr).all()
    h = healthy_liver_mask(liver, [lesion], margin_mm=5.0)
    assert h.GetSize() == liver.GetSize() and h.GetOrigin() == liver.GetOrigin()
    assert h.GetPixelID() == liver.GetPixelID()
    removed = sitk.GetArrayFromImage(h) == 0
    analytic = (d <= 15.0).sum()
    # Dilating the lesion's voxel centres by 5 mm: never beyond 15 mm, everything within 15 - √3·h mm.
    # Not every centre within 15 mm goes: e.g. offset (14, 5, 1) mm (|.|² = 222 <= 225) is more than
    # 5 mm from every lesion voxel centre; the count falls 4 % short of the analytic one here.
    assert not (removed & (d > 15.0)).any()
    assert removed[d <= 15.0 - math.sqrt(3.0)].all()
    assert 0.94 * analytic < removed.sum() <= analytic
    # exactly the voxels within 5 mm of some lesion voxel centre (nearest neighbour by k-d tree)
    dist, _ = cKDTree(p[lesion_arr]).query(p.reshape(-1, 3))
    assert (removed.reshape(-1) == (dist <= 5.0)).all()


def test_healthy_liver_mask_anisotropic_and_fractional():
    g = Grid(size=(40, 40, 20), spacing=(1.0, 1.0, 3.0), origin=(0.0, 0.0, 0.0))
    liver = np.full(g.shape_zyx, 0.5, np.float32)
    les = np.zeros(g.shape_zyx, np.uint8)
    les[10, 20, 20] = 1
    h = sitk.GetArrayFromImage(healthy_liver_mask(on(g, liver), [on(g, les)], margin_mm=6.0))
    assert h.dtype == np.float32
    # along z: 3 mm slices, so slices 8..12 go (6 mm = 2 slices), along x 6 voxels each side
    assert h[8, 20, 20] == 0 and h[7, 20, 20] == 0.5 and h[12, 20, 20] == 0 and h[13, 20, 20] == 0.5
    assert h[10, 20, 14] == 0 and h[10, 20, 13] == 0.5


def test_assign_lobe_majority_fraction():
    g = Grid(size=(20, 10, 10), spacing=(2.0, 2.0, 2.0), origin=(0.0, 0.0, 0.0))
    left = np.zeros(g.shape_zyx, np.uint8)
    left[:, :, 10:] = 1
    right = 1 - left
    les = np.zeros(g.shape_zyx, np.uint8)
    les[4:6, 4:6, 3:13] = 1  # x 3..9 right (7), 10..12 left (3)
    lobe, frac = assign_lobe(on(g, les), on(g, left), on(g, right))
    assert lobe == "right" and frac == 0.7
    lobe, frac = assign_lobe(on(g, les), on(g, right), on(g, left))
    assert lobe == "left" and frac == 0.7


# --------------------------------------------------------------------------- paired lobar comparison

def test_paired_lobe_comparison_lutia_like():
    treated = [17.4, 21.0, 12.3, 25.0, 9.8, 15.2, 30.5, 18.0]
    control = [16.2, 15.0, 12.9, 19.1, 8.7, 14.0, 22.3, 17.5]
    res = paired_lobe_comparison(treated, control)
    d = np.log(np.array(treated) / np.array(control))
    assert res["n"] == 8
    assert res["gmr"] == pytest.approx(math.exp(d.mean()), rel=1e-12)
    lo, hi = stats.t.interval(0.95, 7, loc=d.mean(), scale=stats.sem(d))
    assert res["ci_low"] == pytest.approx(math.exp(lo), rel=1e-12)
    assert res["ci_high"] == pytest.approx(math.exp(hi), rel=1e-12)
    p_ref = stats.ttest_rel(np.log(treated), np.log(control)).pvalue
    assert res["p_ttest"] == pytest.approx(p_ref, rel=1e-12)
    assert res["wilcoxon_method"] == "exact"
    assert res["p_wilcoxon"] == pytest.approx(stats.wilcoxon(d, method="exact").pvalue, rel=1e-12)
    assert res["n_increase"] == 7 and res["share_increase"] == 7 / 8
    assert res["ci_low"] < res["gmr"] < res["ci_high"]
    with pytest.raises(ValueError):
        paired_lobe_comparison([1.0, 2.0], [1.0])
    with pytest.raises(ValueError):
        paired_lobe_comparison([1.0, -2.0], [1.0, 1.0])
    one = paired_lobe_comparison([2.0], [1.0])
    assert one["gmr"] == 2.0 and math.isnan(one["p_ttest"])
