"""Transform bookkeeping: inversion, composition, emission -> reference, reading and writing .tfm files."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import SimpleITK as sitk

__all__ = ["invert_transform", "emission_to_reference", "compose", "write_transform", "read_transform"]

Array = np.ndarray

# =============================================================================== transforms

def invert_transform(t: sitk.Transform, domain: sitk.Image | None = None, field_spacing_mm: float = 4.0,
                     iterations: int = 50) -> sitk.Transform:
    """Inverse of a transform: exact for linear ones, numerical for a B-spline composite.

    A ``CompositeTransform([L, D])`` (p ↦ L(D(p)), D a deformation defined in fixed space, as
    :func:`register_ct` makes) is inverted as q ↦ D⁻¹(L⁻¹(q)). D⁻¹ is a displacement field
    inverted by fixed-point iteration (``sitk.InvertDisplacementField``) on D's own field
    (``DisplacementFieldTransform``) or on D sampled over ``domain``'s extent at spacing
    ``max(domain spacing, field_spacing_mm)`` (B-spline and other non-linear transforms).

    Parameters
    ----------
    t
        Transform to invert.
    domain
        Image whose physical extent the B-spline lives on (the fixed image); required for
        non-linear transforms.
    field_spacing_mm
        Minimum spacing of the sampled inverse field.
    iterations
        Maximum fixed-point iterations.

    Returns
    -------
    sitk.Transform
    """
    if t.GetName() != "CompositeTransform":
        if t.IsLinear():
            return t.Downcast().GetInverse()
        return _invert_nonlinear(t, domain, field_spacing_mm, iterations)
    c = sitk.CompositeTransform(t)
    parts = [c.GetNthTransform(i) for i in range(c.GetNumberOfTransforms())]
    # CompositeTransform([A, B])(p) = A(B(p)), so its inverse is CompositeTransform([B⁻¹, A⁻¹])
    inv = [invert_transform(p, domain, field_spacing_mm, iterations) for p in reversed(parts)]
    return sitk.CompositeTransform(inv)


def _invert_nonlinear(t: sitk.Transform, domain: sitk.Image | None, spacing_mm: float,
                      iterations: int) -> sitk.Transform:
    t = t.Downcast()
    if isinstance(t, sitk.DisplacementFieldTransform):
        field = t.GetDisplacementField()
    else:
        if domain is None:
            raise ValueError("inverting a non-linear transform needs the image it is defined on (domain)")
        sp = np.maximum(np.asarray(domain.GetSpacing()), spacing_mm)
        size = [max(2, int(math.ceil(n * s0 / s1)))
                for n, s0, s1 in zip(domain.GetSize(), domain.GetSpacing(), sp)]
        origin = domain.TransformContinuousIndexToPhysicalPoint([-0.5 + 0.5 * s1 / s0 for s0, s1 in
                                                                 zip(domain.GetSpacing(), sp)])
        ref = sitk.Image(size, sitk.sitkFloat32)
        ref.SetSpacing([float(v) for v in sp])
        ref.SetOrigin(origin)
        ref.SetDirection(domain.GetDirection())
        flt = sitk.TransformToDisplacementFieldFilter()
        flt.SetReferenceImage(ref)
        flt.SetOutputPixelType(sitk.sitkVectorFloat64)
        field = flt.Execute(t)
    inv = sitk.InvertDisplacementField(field, maximumNumberOfIterations=iterations,
                                       maxErrorToleranceThreshold=0.01, meanErrorToleranceThreshold=0.0001,
                                       enforceBoundaryCondition=False)
    out = sitk.DisplacementFieldTransform(sitk.Cast(inv, sitk.sitkVectorFloat64))
    out.SetInterpolator(sitk.sitkLinear)
    return out


def compose(*transforms: sitk.Transform | None) -> sitk.Transform:
    """Composition in *application* order: ``compose(A, B)(p) = B(A(p))``; None members are identity."""
    members = [t for t in transforms if t is not None]
    if not members:
        return sitk.Euler3DTransform()
    if len(members) == 1:
        return members[0]
    return sitk.CompositeTransform(list(reversed(members)))


def emission_to_reference(session_to_reference: sitk.Transform, emission_frame_uid: str, ct_frame_uid: str,
                          emission_to_ct: sitk.Transform | None = None) -> sitk.Transform:
    """Emission-frame points → reference-CT points: emission → session CT → reference CT.

    Parameters
    ----------
    session_to_reference
        Session-CT points → reference points (``RegistrationResult.inverse``; identity for the
        reference session itself).
    emission_frame_uid, ct_frame_uid
        FrameOfReferenceUIDs of the emission series and of the session CT.
    emission_to_ct
        Emission points → session-CT points, needed only when the frame UIDs differ.

    Returns
    -------
    sitk.Transform
        The transform :func:`propagate_mask` takes to carry reference masks onto the emission grid.

    Raises
    ------
    ValueError
        Frames differ and no ``emission_to_ct`` is given (the scans share no coordinate system).
    """
    if emission_frame_uid and emission_frame_uid == ct_frame_uid:
        if emission_to_ct is None:
            return session_to_reference
        return compose(emission_to_ct, session_to_reference)
    if emission_to_ct is None:
        raise ValueError(f"emission frame of reference {emission_frame_uid!r} differs from the CT's "
                         f"{ct_frame_uid!r}: an emission→CT registration is needed")
    return compose(emission_to_ct, session_to_reference)


def write_transform(t: sitk.Transform, path: str | Path) -> Path:
    """Write a transform (``.tfm`` text; use ``.h5`` for displacement fields). Returns the path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteTransform(t, str(p))
    return p


def read_transform(path: str | Path) -> sitk.Transform:
    """Read a transform written by :func:`write_transform` (downcast to its concrete class)."""
    t = sitk.ReadTransform(str(path))
    if t.GetName() == "CompositeTransform":
        c = sitk.CompositeTransform(t)
        if c.GetNumberOfTransforms() == 1:
            return c.GetNthTransform(0).Downcast()
        return c
    return t.Downcast()


