"""CT-to-CT registration: working images, body outline, initial alignment, rigid/affine/deformable stages, QC metrics."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Sequence

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .propagate import dice
from .settings import BODY_HU, RegistrationResult, RegistrationSettings
from .transforms import invert_transform

__all__ = ["register_ct", "body_mask", "initial_alignment"]

Array = np.ndarray

# =============================================================================== image helpers

def _float(img: sitk.Image) -> sitk.Image:
    return sitk.Cast(img, sitk.sitkFloat32) if img.GetPixelID() != sitk.sitkFloat32 else img


def _working_image(ct: sitk.Image, spacing_mm: float) -> sitk.Image:
    """The CT smoothed and resampled to at least ``spacing_mm`` per axis (unchanged if coarser)."""
    ct = _float(ct)
    sp = np.asarray(ct.GetSpacing(), dtype=float)
    if np.all(sp >= spacing_mm - 1e-6):
        return ct
    new_sp = np.maximum(sp, spacing_mm)
    sigma = np.sqrt(np.maximum(new_sp**2 - sp**2, 0.0)) / 2.3548  # FWHM of the new voxel
    smooth = sitk.SmoothingRecursiveGaussian(ct, [float(s) for s in np.maximum(sigma, 1e-3)])
    new_size = [max(1, int(round(n * s / t))) for n, s, t in zip(ct.GetSize(), sp, new_sp)]
    return sitk.Resample(smooth, new_size, sitk.Transform(), sitk.sitkLinear, ct.GetOrigin(),
                         [float(v) for v in new_sp], ct.GetDirection(), -1000.0, sitk.sitkFloat32)


def _windowed(ct: sitk.Image, window: tuple[float, float]) -> sitk.Image:
    return sitk.Clamp(_float(ct), sitk.sitkFloat32, float(window[0]), float(window[1]))


def _fill_holes_axial(mask: Array) -> Array:
    out = np.empty_like(mask)
    for k in range(mask.shape[0]):
        out[k] = ndimage.binary_fill_holes(mask[k])
    return out


def _body_outline(arr: Array, like: sitk.Image) -> sitk.Image:
    """The largest connected component of a thresholded body, holes filled slice by slice, on ``like``'s grid."""
    lab, n = ndimage.label(arr)
    if n > 1:
        sizes = ndimage.sum_labels(np.ones_like(lab, dtype=np.int32), lab, index=np.arange(1, n + 1))
        arr = lab == (int(np.argmax(sizes)) + 1)
    arr = _fill_holes_axial(arr)
    out = sitk.GetImageFromArray(arr.astype(np.uint8))
    out.CopyInformation(like)
    return out


def body_mask(ct: sitk.Image, threshold_hu: float = BODY_HU) -> sitk.Image:
    """Body outline of a CT: HU > ``threshold_hu``, largest 3-D component, holes filled per axial slice.

    Parameters
    ----------
    ct
        CT in HU.
    threshold_hu
        Threshold (default -400 HU).

    Returns
    -------
    sitk.Image
        uint8 mask on the CT's grid.
    """
    arr = sitk.GetArrayViewFromImage(ct) > threshold_hu
    return _body_outline(arr, ct)


def _metric_mask(body: sitk.Image, radius_vox: int = 2) -> sitk.Image:
    return sitk.BinaryDilate(body, [radius_vox] * 3)


def _slice_z(img: sitk.Image) -> Array:
    """Physical z (mm) of the centre of every slice (index k)."""
    n = img.GetSize()[2]
    return np.array([img.TransformContinuousIndexToPhysicalPoint(
        ((img.GetSize()[0] - 1) / 2.0, (img.GetSize()[1] - 1) / 2.0, float(k)))[2] for k in range(n)])


def _axial_profiles(ct: sitk.Image, body: sitk.Image) -> tuple[Array, Array, Array]:
    """Per slice: z (mm); areas (cm²) of body, bone (>300 HU), lung/air inside the body; body centroid.

    The centroid array has a 4th column, 1 where the slice contains body.
    """
    a = sitk.GetArrayViewFromImage(ct)
    b = sitk.GetArrayViewFromImage(body).astype(bool)
    px = float(np.prod(ct.GetSpacing()[:2])) / 100.0
    body_area = b.sum(axis=(1, 2)) * px
    bone = ((a > 300.0) & b).sum(axis=(1, 2)) * px
    lung = ((a < BODY_HU) & b).sum(axis=(1, 2)) * px
    # body centroid per slice in physical x, y
    ny, nx = a.shape[1:]
    jj, ii = np.mgrid[0:ny, 0:nx]
    cnt = np.maximum(b.sum(axis=(1, 2)), 1)
    ci = (b * ii).sum(axis=(1, 2)) / cnt
    cj = (b * jj).sum(axis=(1, 2)) / cnt
    cent = np.array([ct.TransformContinuousIndexToPhysicalPoint((float(i), float(j), float(k)))
                     for k, (i, j) in enumerate(zip(ci, cj))])
    return _slice_z(ct), np.stack([body_area, bone, lung], axis=1), np.concatenate(
        [cent, (b.sum(axis=(1, 2)) > 0)[:, None]], axis=1)


def _z_offset(fixed: sitk.Image, fbody: sitk.Image, moving: sitk.Image, mbody: sitk.Image,
              search_mm: float = 120.0, step_mm: float = 1.0,
              min_overlap: float = 0.5) -> tuple[float, Array, Array]:
    """z shift t (mm) such that fixed slice z looks like moving slice z + t; plus body centroids."""
    zf, pf, cf = _axial_profiles(fixed, fbody)
    zm, pm, cm = _axial_profiles(moving, mbody)
    of, om = np.argsort(zf), np.argsort(zm)
    zf, pf, cf = zf[of], pf[of], cf[of]
    zm, pm, cm = zm[om], pm[om], cm[om]
    grid = np.arange(zf[0], zf[-1] + 1e-6, max(step_mm, 0.5))
    f = np.stack([np.interp(grid, zf, pf[:, i]) for i in range(3)], axis=1)
    scale = np.maximum(np.concatenate([pf, pm]).std(axis=0), 1e-6)
    shorter = min(zf[-1] - zf[0], zm[-1] - zm[0])
    best_t, best_cost = 0.0, math.inf
    for t in np.arange(-search_mm, search_mm + 1e-6, step_mm):
        zz = grid + t
        ok = (zz >= zm[0]) & (zz <= zm[-1])
        if np.count_nonzero(ok) * step_mm < min_overlap * shorter:
            continue
        m = np.stack([np.interp(zz[ok], zm, pm[:, i]) for i in range(3)], axis=1)
        # mean squared standardised difference; a tiny tie-break towards small shifts
        cost = float(np.mean(((f[ok] - m) / scale) ** 2)) + 1e-4 * abs(t) / step_mm
        if cost < best_cost:
            best_t, best_cost = float(t), cost
    # body centroids over the slices both cover
    lo, hi = max(zf[0], zm[0] - best_t), min(zf[-1], zm[-1] - best_t)
    sel_f = (zf >= lo) & (zf <= hi) & (cf[:, 3] > 0)
    sel_m = (zm - best_t >= lo) & (zm - best_t <= hi) & (cm[:, 3] > 0)
    c_f = cf[sel_f, :3].mean(axis=0) if sel_f.any() else _image_centre(fixed)
    c_m = cm[sel_m, :3].mean(axis=0) if sel_m.any() else _image_centre(moving)
    return best_t, c_f, c_m


def _image_centre(img: sitk.Image) -> Array:
    return np.asarray(img.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2.0 for n in img.GetSize()]))


def initial_alignment(fixed: sitk.Image, moving: sitk.Image, fixed_body: sitk.Image | None = None,
                      moving_body: sitk.Image | None = None) -> sitk.Euler3DTransform:
    """Translation-only rigid start (fixed → moving points) from anatomy, not from image geometry.

    The axial offset comes from matching per-slice profiles (body, bone and lung cross-section
    areas) over ±120 mm with at least half of the shorter scan overlapping, which copes with CTs
    of different axial coverage; the in-plane offset from the body-outline centroids over the
    slices both scans cover. The rotation centre is the fixed body centroid.

    Parameters
    ----------
    fixed, moving
        CTs in HU.
    fixed_body, moving_body
        Their body outlines (computed when None).

    Returns
    -------
    sitk.Euler3DTransform
    """
    fb = fixed_body if fixed_body is not None else body_mask(fixed)
    mb = moving_body if moving_body is not None else body_mask(moving)
    tz, c_f, c_m = _z_offset(fixed, fb, moving, mb)
    t = sitk.Euler3DTransform()
    centre = np.array([c_f[0], c_f[1], c_f[2]])
    t.SetCenter([float(v) for v in centre])
    t.SetTranslation([float(c_m[0] - c_f[0]), float(c_m[1] - c_f[1]), float(tz)])
    return t


# =============================================================================== registration core

@contextlib.contextmanager
def itk_threads(n: int) -> Iterator[None]:
    """ITK's global default number of threads set to ``n`` (> 0) inside the block, restored after it: every
    ITK filter and registration created inside (metric, optimiser, demons) uses ``n`` threads."""
    if n <= 0:
        yield
        return
    before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(int(n))
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(before)


def _method(settings: RegistrationSettings, fixed_mask: sitk.Image | None, shrink: Sequence[int],
            sigmas: Sequence[float]) -> sitk.ImageRegistrationMethod:
    r = sitk.ImageRegistrationMethod()
    r.SetMetricAsMattesMutualInformation(numberOfHistogramBins=settings.histogram_bins)
    r.SetMetricSamplingStrategy(r.RANDOM)
    r.SetMetricSamplingPercentage(float(settings.sampling_percentage), int(settings.seed))
    if fixed_mask is not None:
        r.SetMetricFixedMask(fixed_mask)
    r.SetInterpolator(sitk.sitkLinear)
    r.SetShrinkFactorsPerLevel([int(s) for s in shrink])
    r.SetSmoothingSigmasPerLevel([float(s) for s in sigmas])
    r.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    return r


def _rigid_stage(f: sitk.Image, m: sitk.Image, fmask: sitk.Image, init: sitk.Transform,
                 s: RegistrationSettings, shrink: Sequence[int], sigmas: Sequence[float],
                 iterations: int) -> tuple[sitk.Transform, float]:
    r = _method(s, fmask, shrink, sigmas)
    r.SetOptimizerAsRegularStepGradientDescent(learningRate=4.0, minStep=0.01, numberOfIterations=iterations,
                                               relaxationFactor=0.6, gradientMagnitudeTolerance=1e-6)
    r.SetOptimizerScalesFromPhysicalShift()
    r.SetInitialTransform(init, inPlace=False)
    out = r.Execute(f, m)
    return _unwrap(out), float(r.GetMetricValue())


def _affine_stage(f: sitk.Image, m: sitk.Image, fmask: sitk.Image, rigid: sitk.Transform,
                  s: RegistrationSettings) -> tuple[sitk.Transform, float]:
    e = sitk.Euler3DTransform(rigid)
    a = sitk.AffineTransform(3)
    a.SetCenter(e.GetCenter())
    a.SetMatrix(e.GetMatrix())
    a.SetTranslation(e.GetTranslation())
    # the rigid result is already close: the two finest levels, half the iterations
    shrink, sigmas = tuple(s.shrink_factors[-2:]), tuple(s.smoothing_sigmas[-2:])
    r = _method(s, fmask, shrink, sigmas)
    r.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=0.005,
                                               numberOfIterations=max(1, s.max_iterations // 2),
                                               relaxationFactor=0.6,
                                               gradientMagnitudeTolerance=1e-6)
    r.SetOptimizerScalesFromPhysicalShift()
    r.SetInitialTransform(a, inPlace=False)
    out = r.Execute(f, m)
    return _unwrap(out), float(r.GetMetricValue())


def _bspline_stage(f: sitk.Image, m: sitk.Image, fmask: sitk.Image, linear: sitk.Transform,
                   s: RegistrationSettings) -> sitk.Transform:
    """B-spline FFD in fixed space after ``linear``; f and m already windowed for this stage."""
    extent = np.asarray(f.GetSize()) * np.asarray(f.GetSpacing())
    mesh = [max(1, int(round(e / s.bspline_spacing_mm))) for e in extent]
    bs = sitk.BSplineTransformInitializer(f, mesh, order=3)
    r = _method(s, fmask, (2, 1), (1.0, 0.0))
    r.SetMetricAsMattesMutualInformation(numberOfHistogramBins=64)
    r.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5, numberOfIterations=s.bspline_iterations,
                           maximumNumberOfCorrections=5,
                           maximumNumberOfFunctionEvaluations=4 * s.bspline_iterations,
                           costFunctionConvergenceFactor=1e7)
    r.SetMovingInitialTransform(linear)
    r.SetInitialTransform(bs, inPlace=True)
    r.Execute(f, m)
    return sitk.CompositeTransform([linear, bs])


def _demons_stage(f: sitk.Image, m: sitk.Image, linear: sitk.Transform,
                  s: RegistrationSettings) -> sitk.Transform:
    """Symmetric-forces demons in fixed space after ``linear``; f and m windowed, m on its own grid.

    The moving image is resampled once onto the fixed grid through ``linear``; the field u found
    there gives p ↦ linear(p + u(p)).
    """
    low = float(s.deformable_hu_window[0])
    m_on_f = sitk.Resample(m, f, linear, sitk.sitkLinear, low, sitk.sitkFloat32)
    # where the moving scan has no data (other axial coverage) use the fixed image: no force there
    cover = _coverage(m, f, linear)
    m_on_f = sitk.Mask(m_on_f, cover) + sitk.Mask(f, 1 - cover)
    if s.demons_smoothing_mm > 0:
        f = sitk.SmoothingRecursiveGaussian(f, float(s.demons_smoothing_mm))
        m_on_f = sitk.SmoothingRecursiveGaussian(m_on_f, float(s.demons_smoothing_mm))
    field: sitk.Image | None = None
    for shrink in s.demons_levels:
        if shrink > 1:
            sig = [0.5 * shrink * v for v in f.GetSpacing()]
            fs = sitk.Shrink(sitk.SmoothingRecursiveGaussian(f, sig), [int(shrink)] * 3)
            ms = sitk.Resample(sitk.SmoothingRecursiveGaussian(m_on_f, sig), fs, sitk.Transform(),
                               sitk.sitkLinear, low, sitk.sitkFloat32)
        else:
            fs, ms = f, m_on_f
        if field is None:
            init = sitk.Image(fs.GetSize(), sitk.sitkVectorFloat64, 3)
            init.CopyInformation(fs)
        else:
            init = sitk.Resample(field, fs, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkVectorFloat64)
        d = sitk.FastSymmetricForcesDemonsRegistrationFilter()
        d.SetNumberOfIterations(int(s.demons_iterations))
        d.SetStandardDeviations(float(s.demons_sigma_vox))
        field = d.Execute(fs, ms, init)
    assert field is not None
    if field.GetSize() != f.GetSize():
        field = sitk.Resample(field, f, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkVectorFloat64)
    dft = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
    dft.SetInterpolator(sitk.sitkLinear)
    return sitk.CompositeTransform([linear, dft])


def _unwrap(t: sitk.Transform) -> sitk.Transform:
    """Registration outputs are composites of one transform: return that transform, downcast."""
    if t.GetName() == "CompositeTransform":
        c = sitk.CompositeTransform(t)
        if c.GetNumberOfTransforms() == 1:
            return c.GetNthTransform(0).Downcast()
        c.FlattenTransform()
        return c
    return t.Downcast()


def _rotated_start(t0: sitk.Euler3DTransform, angle_z_deg: float) -> sitk.Euler3DTransform:
    t = sitk.Euler3DTransform(t0)
    ax, ay, az = t0.GetAngleX(), t0.GetAngleY(), t0.GetAngleZ()
    t.SetRotation(ax, ay, az + math.radians(angle_z_deg))
    return t


def _as_euler(t: sitk.Transform, centre: Sequence[float]) -> sitk.Euler3DTransform:
    """A rigid transform as Euler3D about ``centre`` (from the nearest rotation of a linear map)."""
    t = t.Downcast()
    if isinstance(t, sitk.Euler3DTransform):
        return sitk.Euler3DTransform(t)
    m, off = _matrix_offset(t)
    u, _, vt = np.linalg.svd(m)
    r = u @ vt
    if np.linalg.det(r) < 0:
        u[:, -1] *= -1
        r = u @ vt
    e = sitk.Euler3DTransform()
    e.SetCenter([float(v) for v in centre])
    e.SetMatrix([float(v) for v in r.ravel()])
    c = np.asarray(centre, dtype=float)
    e.SetTranslation([float(v) for v in (m @ c + off - c)])
    return e


def _matrix_offset(t: sitk.Transform) -> tuple[Array, Array]:
    """Matrix and offset (y = M x + o) of a linear transform (tested numerically)."""
    pts = np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]) * 100.0
    y = np.array([t.TransformPoint([float(v) for v in p]) for p in pts])
    o = y[0]
    m = (y[1:] - o).T / 100.0
    return m, o


def best_rigid_start(fixed_w: sitk.Image, moving_w: sitk.Image, candidates: list[tuple[sitk.Transform, sitk.Image]],
                     s: RegistrationSettings) -> tuple[sitk.Euler3DTransform, float]:
    """The best of several rigid starts, each refined by a short coarse rigid stage with its metric mask:
    (refined start, its metric). Ties keep the first candidate."""
    best: tuple[float, sitk.Transform] | None = None
    coarse = (s.shrink_factors[0],)
    for start, mask in candidates:
        cand, val = _rigid_stage(fixed_w, moving_w, mask, start, s, coarse, (s.smoothing_sigmas[0],), 40)
        if best is None or val < best[0]:
            best = (val, cand)
    assert best is not None
    return sitk.Euler3DTransform(best[1]), best[0]


def _register_one(fixed_w: sitk.Image, moving_w: sitk.Image, fmask: sitk.Image, fixed_ct: sitk.Image,
                  moving_ct: sitk.Image, fbody: sitk.Image, mbody: sitk.Image, s: RegistrationSettings,
                  initial: sitk.Transform | None) -> tuple[sitk.Transform, sitk.Transform, dict[str, float]]:
    """One direction: returns (final transform, start of the full rigid stage, stage metrics).

    ``*_w`` are the HU-windowed working images, ``*_ct`` the working images in HU, ``*body``
    their body outlines, ``fmask`` the metric mask on the fixed image.
    """
    stages: dict[str, float] = {}
    if initial is None:
        t0 = initial_alignment(fixed_ct, moving_ct, fbody, mbody)
    else:
        centre = np.asarray(_body_centroid(fbody))
        t0 = _as_euler(initial, centre)
    angles = s.start_angles_deg if s.multi_start else (0.0,)
    if len(angles) > 1:
        start, stages["multi_start"] = best_rigid_start(
            fixed_w, moving_w, [(_rotated_start(t0, a), fmask) for a in angles], s)
    else:
        start = _rotated_start(t0, angles[0])
    # sample the metric only where the moving scan has data under the start (minus a margin), so
    # that the sample set does not change with the transform (overlap bias with other coverage)
    fmask = _overlap_mask(fmask, moving_w, start, s.overlap_margin_mm)
    rigid, val = _rigid_stage(fixed_w, moving_w, fmask, start, s, s.shrink_factors, s.smoothing_sigmas,
                              s.max_iterations)
    stages["rigid"] = val
    final: sitk.Transform = rigid
    fmask = _overlap_mask(fmask, moving_w, rigid, s.overlap_margin_mm)
    if s.affine:
        aff, val = _affine_stage(fixed_w, moving_w, fmask, rigid, s)
        stages["affine"] = val
        m_r = _final_metric(fixed_w, moving_w, fmask, rigid, s)
        m_a = _final_metric(fixed_w, moving_w, fmask, aff, s)
        stages["rigid_eval"], stages["affine_eval"] = m_r, m_a
        # the affine result must raise MI (metric more negative) by affine_min_gain (relative)
        if m_a <= m_r * (1.0 + s.affine_min_gain):
            final = aff
            stages["affine_used"] = 1.0
        else:
            stages["affine_used"] = 0.0
    if s.deformable:
        if s.deformable_model not in ("demons", "bspline"):
            raise ValueError(f"unknown deformable_model {s.deformable_model!r} (demons or bspline)")
        f_hu = _working_image(fixed_ct, s.deformable_spacing_mm)
        fd = _windowed(f_hu, s.deformable_hu_window)
        md = _windowed(_working_image(moving_ct, s.deformable_spacing_mm), s.deformable_hu_window)
        if s.deformable_model == "demons":
            final = _demons_stage(fd, md, final, s)
        else:
            final = _bspline_stage(fd, md, _metric_mask(body_mask(f_hu)), final, s)
        stages["deformable"] = _final_metric(fixed_w, moving_w, fmask, final, s)
    return final, start, stages


def _body_centroid(body: sitk.Image) -> tuple[float, float, float]:
    st = sitk.LabelShapeStatisticsImageFilter()
    st.Execute(body)
    if not st.HasLabel(1):
        return body.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2.0 for n in body.GetSize()])
    return st.GetCentroid(1)


def _final_metric(fixed_w: sitk.Image, moving_w: sitk.Image, fmask: sitk.Image, t: sitk.Transform,
                  s: RegistrationSettings) -> float:
    r = sitk.ImageRegistrationMethod()
    r.SetMetricAsMattesMutualInformation(numberOfHistogramBins=s.histogram_bins)
    r.SetMetricSamplingStrategy(r.RANDOM)
    r.SetMetricSamplingPercentage(min(1.0, max(float(s.sampling_percentage), 0.5)), int(s.seed))
    r.SetMetricFixedMask(fmask)
    r.SetInterpolator(sitk.sitkLinear)
    # the whole map as the fixed "moving initial" transform, identity as the optimisable one: ITK
    # refuses a displacement field as the optimisable transform unless its grid is the virtual domain
    r.SetMovingInitialTransform(t)
    r.SetInitialTransform(sitk.Euler3DTransform(), inPlace=False)
    return float(r.MetricEvaluate(fixed_w, moving_w))


def _coverage(moving: sitk.Image, fixed: sitk.Image, t: sitk.Transform) -> sitk.Image:
    """uint8 mask on ``fixed``'s grid: 1 where ``t`` maps the voxel centre inside ``moving``'s domain."""
    ones = sitk.Image(moving.GetSize(), sitk.sitkUInt8) + 1
    ones.CopyInformation(moving)
    return sitk.Resample(ones, fixed, t, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)


def _overlap_mask(fmask: sitk.Image, moving: sitk.Image, t: sitk.Transform, margin_mm: float) -> sitk.Image:
    """``fmask`` restricted to fixed voxels mapped by ``t`` at least ``margin_mm`` inside ``moving``."""
    cover = _coverage(moving, fmask, t)
    if margin_mm > 0:
        radius = [max(1, int(math.ceil(margin_mm / sp))) for sp in fmask.GetSpacing()]
        cover = sitk.BinaryErode(cover, radius, sitk.sitkBox, 0, 1, True)
    out = sitk.And(sitk.Cast(fmask > 0, sitk.sitkUInt8), cover)
    if not np.any(sitk.GetArrayViewFromImage(out)):
        return fmask  # no overlap at all: let the registration fail visibly rather than crash
    return out


def _body_dice(fixed_ct: sitk.Image, moving_ct: sitk.Image, fbody: sitk.Image, t: sitk.Transform) -> float:
    res = sitk.Resample(moving_ct, fixed_ct, t, sitk.sitkLinear, -1000.0, sitk.sitkFloat32)
    cover = sitk.GetArrayFromImage(_coverage(moving_ct, fixed_ct, t)).astype(bool)
    mb = sitk.GetArrayFromImage(body_mask(res)).astype(bool) & cover
    fb = sitk.GetArrayViewFromImage(fbody).astype(bool) & cover
    return dice(fb, mb)


def _inverse_consistency(fwd: sitk.Transform, bwd: sitk.Transform, mbody: sitk.Image,
                         max_points: int = 4000) -> float:
    """Mean |fwd(bwd(p)) - p| (mm) over up to ``max_points`` voxel centres p of the moving body."""
    idx = np.argwhere(sitk.GetArrayViewFromImage(mbody) > 0)
    if len(idx) == 0:
        return math.nan
    step = max(1, len(idx) // max_points)
    idx = idx[::step]
    err = []
    for k, j, i in idx:
        p = np.asarray(mbody.TransformIndexToPhysicalPoint((int(i), int(j), int(k))))
        q = np.asarray(fwd.TransformPoint(bwd.TransformPoint([float(v) for v in p])))
        err.append(np.linalg.norm(q - p))
    return float(np.mean(err))


def register_ct(fixed: sitk.Image, moving: sitk.Image,
                settings: RegistrationSettings | None = None,
                initial: sitk.Transform | None = None) -> RegistrationResult:
    """Register a session CT (moving) to the reference CT (fixed), with QC.

    Parameters
    ----------
    fixed
        Reference CT (HU), the space the masks are drawn in.
    moving
        Session CT (HU).
    settings
        :class:`RegistrationSettings` (defaults when None).
    initial
        Optional start (fixed → moving points, any linear transform; its nearest rigid map is used),
        replacing the automatic initialisation. The backward registration starts from its inverse.
        With ``settings.multi_start`` the start angles are added to its rotation about z.

    Returns
    -------
    RegistrationResult
        ``transform`` maps reference points to session points; ``inverse`` session to reference.
    """
    with itk_threads((settings or RegistrationSettings()).threads):
        return _register_ct(fixed, moving, settings, initial)


def _register_ct(fixed: sitk.Image, moving: sitk.Image, settings: RegistrationSettings | None,
                 initial: sitk.Transform | None) -> RegistrationResult:
    s = settings if settings is not None else RegistrationSettings()
    if s.deformable and s.deformable_model not in ("demons", "bspline"):
        raise ValueError(f"unknown deformable_model {s.deformable_model!r} (demons or bspline)")
    fixed_hu = _working_image(fixed, s.working_spacing_mm)
    moving_hu = _working_image(moving, s.working_spacing_mm)
    fixed_w, moving_w = _windowed(fixed_hu, s.hu_window), _windowed(moving_hu, s.hu_window)
    fbody, mbody = body_mask(fixed_hu), body_mask(moving_hu)
    fmask, mmask = _metric_mask(fbody), _metric_mask(mbody)

    fwd, start, stages = _register_one(fixed_w, moving_w, fmask, fixed_hu, moving_hu, fbody, mbody, s,
                                       initial)
    metric = _final_metric(fixed_w, moving_w, fmask, fwd, s)
    stages["final"] = metric
    body_d = _body_dice(fixed_hu, moving_hu, fbody, fwd)
    inverse = invert_transform(fwd, fixed_hu)

    backward: sitk.Transform | None = None
    ic = math.nan
    if s.check_inverse_consistency:
        init_b = None if initial is None else _as_euler(initial, _body_centroid(fbody)).GetInverse()
        backward, _, _ = _register_one(moving_w, fixed_w, mmask, moving_hu, fixed_hu, mbody, fbody, s, init_b)
        ic = _inverse_consistency(fwd, backward, mbody)

    reasons: list[str] = []
    if not metric <= s.max_metric:
        reasons.append(f"final Mattes MI {metric:.3f} > max_metric {s.max_metric:.3f} (images do not match)")
    if s.check_inverse_consistency and not ic <= s.max_inverse_consistency_mm:
        reasons.append(f"inverse consistency {ic:.2f} mm > {s.max_inverse_consistency_mm:.2f} mm "
                       "(forward and backward registrations disagree)")
    if not body_d >= s.min_body_dice:
        reasons.append(f"body outline Dice {body_d:.3f} < {s.min_body_dice:.3f}")
    return RegistrationResult(transform=fwd, metric=metric, inverse_consistency_mm=ic, body_dice=body_d,
                              passed=not reasons, reasons=reasons, inverse=inverse, backward=backward,
                              initial_transform=start, stages=stages)


