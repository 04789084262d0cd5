"""Settings and result of a CT-to-CT registration (frozen dataclasses)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import SimpleITK as sitk

__all__ = ["RegistrationSettings", "RegistrationResult"]

Array = np.ndarray

#: HU threshold of the body outline.
BODY_HU = -400.0


# =============================================================================== settings / result

@dataclass
class RegistrationSettings:
    """Parameters of :func:`register_ct`.

    Parameters
    ----------
    deformable
        Add a deformable stage after the linear stage(s) (model: ``deformable_model``).
    affine
        Rigid → affine; ``False`` = rigid only (before the optional deformable stage).
    affine_min_gain
        The affine result replaces the rigid one only when it improves the final Mattes MI by at
        least this fraction (e.g. 0.01 = 1 %; both evaluated identically). Same-patient CTs are
        related by a rigid map up to breathing; the 6 extra affine parameters otherwise fit
        interpolation noise of the voxel staircase (on the tiny synthetic cohort they raise MI by
        ≤ 0.2 % and cost 0.5–1.3 mm of target registration error). 0 = keep the affine result
        whenever it is not worse, ``-math.inf`` = always keep it; ``affine=False`` skips the stage.
    hu_window
        CT intensities are clipped to this window before the metric is computed.
    sampling_percentage
        Fraction of the (masked) fixed voxels sampled per iteration (random, fixed seed).
    max_metric
        QC threshold on the final **Mattes mutual information** value as ITK reports it
        (the *negative* MI in nats, lower is better), evaluated on the HU-windowed working images
        with a fixed-seed random sample of at least half the voxels of the dilated fixed body
        outline. Pass requires ``metric <= max_metric``. On the tiny cohort good registrations
        give -0.90 to -0.93 and a result 10–17 mm off about -0.6 to -0.7: the default only
        catches gross failures (wrong image, no overlap); inverse consistency is the sensitive check.
    max_inverse_consistency_mm
        QC threshold on the mean inverse-consistency error over body points.
    min_body_dice
        QC threshold on the body-outline Dice (fixed vs resampled moving, overlap region only).
    multi_start
        Try every angle of ``start_angles_deg`` about z and keep the best; off = one start.
    start_angles_deg
        Rotations about z (degrees) of the multi-start.
    shrink_factors, smoothing_sigmas
        Multi-resolution pyramid of the rigid and affine stages (sigmas in voxels).
    histogram_bins
        Mattes MI histogram bins.
    max_iterations
        Iterations per resolution level of the rigid/affine stages.
    deformable_model
        ``"demons"`` (default): symmetric-forces demons, a dense displacement field regularised by
        Gaussian smoothing, multi-resolution. ``"bspline"``: cubic B-spline free-form deformation,
        Mattes MI, L-BFGS-B. On the tiny synthetic patients (5 mm voxels, Gaussian liver
        deformation of 3–6 mm) demons lowered the lesion TRE from 2.8 to 1.7 mm in a few seconds;
        the B-spline stage took 8–40 s and its TRE ranged 1.6–3.5 mm depending on mesh and
        metric, so it is offered but not the default.
    deformable_hu_window
        HU window of the deformable stage: soft tissue, where the liver (≈60 HU), its lesions and
        the surrounding tissue (≈35 HU) differ; in ``hu_window`` they fall in adjacent histogram bins.
    deformable_spacing_mm
        The deformable stage (and its displacement field) runs on images of at least this spacing.
    demons_levels, demons_iterations, demons_sigma_vox
        Shrink factors, iterations per level and Gaussian regularisation of the field (standard
        deviation in voxels of each level) of the demons stage. One full-resolution level by
        default: after the linear stage the residual motion is below a voxel of the tiny images,
        and coarse demons levels made the result worse there.
    demons_smoothing_mm
        Gaussian smoothing (σ, mm) of both images before demons: demons forces are proportional
        to intensity differences, and CT noise in the homogeneous liver otherwise drives them
        (lesion TRE 2.2 → 1.4 mm on the synthetic case).
    bspline_spacing_mm
        Control-point spacing of the B-spline stage.
    bspline_iterations
        L-BFGS-B iterations per level of the B-spline stage.
    working_spacing_mm
        Images with a finer spacing are smoothed and resampled to this spacing before registration.
        4 mm: a clinical 512×512×250 CT pair registers in ~15 s per direction with a lesion TRE of
        0.15 mm on the synthetic patient (2 mm: 83 s for the same TRE).
    overlap_margin_mm
        The metric samples only fixed voxels that the start transform maps at least this far inside
        the moving scan (re-evaluated after the rigid stage). Otherwise, with CTs of different axial
        coverage, the set of valid samples changes with the transform and biases it (2–3 mm with
        a 180 mm session CT on the tiny cohort).
    check_inverse_consistency
        Register the pair in both directions (doubles the run time). When off,
        ``inverse_consistency_mm`` is NaN and not part of QC.
    seed
        Seed of the metric's random sampling (results are reproducible).
    threads
        ITK threads while a registration runs (:func:`register_ct`, :func:`register_multimodal`; the
        global default is restored afterwards). 1 (default) makes every registration bit-reproducible: ITK's
        multi-threaded Mattes MI adds per-thread partial sums in an order that varies between runs (measured:
        ~1e-7 relative in mask volumes, up to ~1e-4 in QC metrics between two runs of the same code). 0
        keeps ITK's default (every core), reproducible only to that level.
    """

    deformable: bool = False
    affine: bool = True
    affine_min_gain: float = 0.01
    hu_window: tuple[float, float] = (-200.0, 1200.0)
    sampling_percentage: float = 0.2
    max_metric: float = -0.3
    max_inverse_consistency_mm: float = 2.0
    min_body_dice: float = 0.95
    multi_start: bool = True
    start_angles_deg: tuple[float, ...] = (-6.0, 0.0, 6.0)
    shrink_factors: tuple[int, ...] = (4, 2, 1)
    smoothing_sigmas: tuple[float, ...] = (2.0, 1.0, 0.0)
    histogram_bins: int = 50
    max_iterations: int = 200
    deformable_model: str = "demons"
    deformable_hu_window: tuple[float, float] = (-150.0, 250.0)
    deformable_spacing_mm: float = 4.0
    demons_levels: tuple[int, ...] = (1,)
    demons_iterations: int = 50
    demons_sigma_vox: float = 2.0
    demons_smoothing_mm: float = 5.0
    bspline_spacing_mm: float = 80.0
    bspline_iterations: int = 30
    working_spacing_mm: float = 4.0
    overlap_margin_mm: float = 10.0
    check_inverse_consistency: bool = True
    seed: int = 20240108
    threads: int = 1
    mr_max_metric: float = -0.2
    mr_min_body_dice: float = 0.9
    mr_body_fraction: float = 0.1
    emission_max_metric: float = -0.1
    emission_min_body_dice: float = 0.85
    emission_max_inverse_consistency_mm: float = 6.0
    z_search_mm: float = 150.0
    multimodal_sampling_percentage: float = 0.5
    emission_hu_window: tuple[float, float] = (-150.0, 250.0)
    emission_ct_smoothing_mm: float = 0.0
    multimodal_polish: bool = True


@dataclass
class RegistrationResult:
    """Outcome of :func:`register_ct`.

    Attributes
    ----------
    transform
        Maps points of the FIXED (reference) image space to the MOVING (session) space
        (SimpleITK resampling convention). Rigid/affine: an ``Euler3DTransform`` /
        ``AffineTransform``; deformable: ``CompositeTransform([linear, deformation])`` where the
        deformation (a ``DisplacementFieldTransform`` for demons, a ``BSplineTransform``), defined
        in fixed space, is applied first: p ↦ linear(p + u(p)).
    metric
        Final Mattes MI (negative, nats; lower is better), see :attr:`RegistrationSettings.max_metric`.
    inverse_consistency_mm
        Mean |T_fwd(T_bwd(p)) - p| over body points p of the moving image, where T_bwd is an
        independent registration with the roles swapped. NaN when not computed.
    body_dice
        Dice of the body outlines (CT > -400 HU, largest component, holes filled per axial
        slice) of the fixed CT and the resampled moving CT, inside the region both scans cover.
    passed
        All QC checks passed.
    reasons
        Why QC failed (empty when passed).
    inverse
        Maps MOVING (session) points to FIXED (reference) points: the inverse of ``transform``
        (exact for linear transforms; a numerically inverted displacement field for the
        deformable part, see :func:`invert_transform`). This is the transform
        :func:`propagate_mask` takes for a session's grid.
    backward
        The independent moving→fixed registration used for inverse consistency (or None).
    initial_transform
        The start of the rigid stage (after initialisation/multi-start).
    stages
        Metric value after each stage, for the log.
    """

    transform: sitk.Transform
    metric: float
    inverse_consistency_mm: float
    body_dice: float
    passed: bool
    reasons: list[str] = field(default_factory=list)
    inverse: sitk.Transform | None = None
    backward: sitk.Transform | None = None
    initial_transform: sitk.Transform | None = None
    stages: dict[str, float] = field(default_factory=dict)

    def qc_dict(self) -> dict[str, Any]:
        """The QC numbers as a JSON-friendly dict."""
        return {"metric": self.metric, "metric_kind": "mattes_mi",
                "inverse_consistency_mm": self.inverse_consistency_mm, "body_dice": self.body_dice,
                "passed": self.passed, "reasons": list(self.reasons), "stages": dict(self.stages)}


