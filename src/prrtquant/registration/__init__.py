"""CT→CT registration, transform bookkeeping and mask propagation onto emission grids.

Every image stays a SimpleITK image in physical (DICOM LPS, mm) space; nothing is ever
re-gridded except in the single final resampling of a mask onto its target grid.

Conventions
-----------
Two directions are in play and the names say which one a transform is:

``RegistrationResult.transform``  (*reference → session*)
    Maps a point of the **fixed** image (the patient's reference CT) to the corresponding point
    of the **moving** image (a session CT). This is SimpleITK's resampling convention: resampling
    the session CT with it onto the reference grid aligns it with the reference CT.
``RegistrationResult.inverse``  (*session → reference*)
    Maps a point of the session's scanner frame to the reference frame. Exact for rigid/affine
    transforms, a numerically inverted displacement field for the deformable stage
    (:func:`invert_transform`). This is the direction :func:`propagate_mask` needs, because
    a mask drawn on the reference CT is *sampled* at target (session) voxel centres.

A session's emission image shares the frame of reference of its CT (same FrameOfReferenceUID),
so the emission→session-CT map is the identity; :func:`emission_to_reference` composes
emission → session CT → reference CT and refuses to guess when the UIDs differ and no
emission→CT transform is given.

Pipeline of :func:`register_ct`
-------------------------------
1. CT intensities clipped to ``hu_window``; images finer than ``working_spacing_mm`` are
   smoothed and resampled to it (a clinical 0.98 mm CT is registered at 2 mm).
2. Initialisation that copes with repositioning of a few cm and with CTs of different axial
   coverage: the axial (z) offset is found by matching per-slice profiles of bone, lung and
   body cross-section areas (1-D search), x/y from the body-outline centroids over the
   slices both scans cover, the rotation centre at the fixed body centroid; then a
   multi-start over a few rotations about z, each refined by a short coarse rigid
   registration, keeping the best metric.
3. Rigid (Euler3D) multi-resolution registration (shrink factors 4, 2, 1; smoothing sigmas
   2, 1, 0 voxels), Mattes mutual information, random sampling inside the dilated fixed body
   outline, regular-step gradient descent with physical-shift scales.
4. Optional affine stage (initialised from the rigid result, kept only when it raises MI by
   ``affine_min_gain``), optional deformable stage composed *before* it in fixed space
   (symmetric-forces demons by default, or a B-spline FFD) on soft-tissue-windowed images.
5. QC: final Mattes MI, inverse consistency (the pair is registered in both directions,
   independently initialised), body-outline Dice of fixed vs resampled moving inside the
   region both scans cover.

Masks (:func:`propagate_mask`) are carried by resampling a volume-preserving signed distance
map of the reference mask once, at the target voxel centres (binary) or at a 4×4×4 sub-grid of
every target voxel (fractional, partial-volume weights).
"""

from __future__ import annotations

from .ct import body_mask, initial_alignment, register_ct
from .multimodal import (
    intensity_body_mask,
    multimodal_initial_alignment,
    register_emission_to_ct,
    register_mr_to_ct,
    register_multimodal,
)
from .propagate import dice, propagate_mask, propagate_masks, signed_distance
from .qc import emission_overlay_png, fusion_overlay_png, qc_overlay_png
from .settings import RegistrationResult, RegistrationSettings
from .transforms import compose, emission_to_reference, invert_transform, read_transform, write_transform

__all__ = [
    "RegistrationSettings", "RegistrationResult", "register_ct", "body_mask", "initial_alignment",
    "register_multimodal", "register_mr_to_ct", "register_emission_to_ct", "intensity_body_mask",
    "multimodal_initial_alignment", "invert_transform", "emission_to_reference", "compose", "write_transform",
    "read_transform", "signed_distance", "propagate_mask", "propagate_masks", "dice", "qc_overlay_png",
    "emission_overlay_png", "fusion_overlay_png",
]
