"""QC figures of a registration: CT overlays, MR fusion, emission with contours."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import SimpleITK as sitk

from .ct import _float

__all__ = ["qc_overlay_png", "emission_overlay_png", "fusion_overlay_png"]

Array = np.ndarray

# =============================================================================== overlays

def _centre_index(img: sitk.Image, centre_mm: Sequence[float] | None) -> tuple[int, int, int]:
    if centre_mm is None:
        return tuple(int(n // 2) for n in img.GetSize())  # type: ignore[return-value]
    idx = img.TransformPhysicalPointToContinuousIndex([float(v) for v in centre_mm])
    ijk = tuple(int(np.clip(round(v), 0, n - 1)) for v, n in zip(idx, img.GetSize()))
    return ijk  # type: ignore[return-value]


def _views(arr: Array, spacing: Sequence[float], ijk: Sequence[int]) -> list[tuple[str, Array, float]]:
    """(title, 2-D slice, aspect) of the axial, coronal, sagittal planes through ``ijk`` (arr is z, y, x)."""
    i, j, k = ijk
    sx, sy, sz = spacing
    return [("axial", arr[k, :, :], sy / sx), ("coronal", arr[::-1, j, :], sz / sx),
            ("sagittal", arr[::-1, :, i], sz / sy)]


def _three_panels() -> tuple[Any, Any, Any]:
    """A matplotlib (Agg) figure with three side-by-side panels: (pyplot, figure, axes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 4.4))
    return plt, fig, axes


def _save_panels(plt: Any, fig: Any, path: str | Path, title: str) -> Path:
    fig.suptitle(title)
    fig.tight_layout()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=80)
    plt.close(fig)
    return p


def qc_overlay_png(fixed_ct: sitk.Image, moving_ct_resampled: sitk.Image, path: str | Path,
                   centre_mm: Sequence[float] | None = None, window: tuple[float, float] = (-200.0, 400.0),
                   checker_mm: float = 40.0, title: str | None = None) -> Path:
    """Checkerboard of the fixed CT and the moving CT resampled onto it, three orthogonal slices.

    Parameters
    ----------
    fixed_ct
        Reference CT.
    moving_ct_resampled
        Session CT resampled onto ``fixed_ct``'s grid (``sitk.Resample(moving, fixed, result.transform)``).
    path
        PNG to write.
    centre_mm
        Point the slices go through (image centre when None).
    window
        Display window (HU).
    checker_mm
        Checker square size.
    title
        Figure title.

    Returns
    -------
    Path
    """
    f = np.clip(sitk.GetArrayFromImage(_float(fixed_ct)), *window)
    m = np.clip(sitk.GetArrayFromImage(_float(moving_ct_resampled)), *window)
    if f.shape != m.shape:
        raise ValueError("moving_ct_resampled must be on the fixed CT's grid")
    sp = fixed_ct.GetSpacing()
    zz, yy, xx = np.indices(f.shape)
    cells = (np.floor(xx * sp[0] / checker_mm) + np.floor(yy * sp[1] / checker_mm)
             + np.floor(zz * sp[2] / checker_mm)).astype(int) % 2
    board = np.where(cells == 0, f, m)
    ijk = _centre_index(fixed_ct, centre_mm)
    plt, fig, axes = _three_panels()
    for ax, (name, sl, aspect) in zip(axes, _views(board, sp, ijk)):
        ax.imshow(sl, cmap="gray", vmin=window[0], vmax=window[1], aspect=aspect, interpolation="nearest")
        ax.set_title(name)
        ax.axis("off")
    return _save_panels(plt, fig, path, title or "CT/CT checkerboard (fixed | resampled moving)")


def fusion_overlay_png(fixed_ct: sitk.Image, moving_resampled: sitk.Image, path: str | Path,
                       centre_mm: Sequence[float] | None = None, window: tuple[float, float] = (-200.0, 400.0),
                       title: str | None = None) -> Path:
    """Fused overlay of a CT (grey → green) and another modality resampled onto it (magenta), three planes.

    For MR or emission images, whose grey levels do not continue the CT's across a checkerboard
    edge: where the two agree the fusion is grey, a misregistration shows as green and magenta
    fringes.

    Parameters
    ----------
    fixed_ct
        The CT (HU).
    moving_resampled
        The other image resampled onto ``fixed_ct``'s grid (``sitk.Resample(other, ct, result.transform)``).
    path
        PNG to write.
    centre_mm
        Point the slices go through (image centre when None).
    window
        CT display window (HU); the other image is shown from 0 to its 99.5th percentile.
    title
        Figure title.

    Returns
    -------
    Path
    """
    f = np.clip((sitk.GetArrayFromImage(_float(fixed_ct)) - window[0]) / (window[1] - window[0]), 0.0, 1.0)
    m = sitk.GetArrayFromImage(_float(moving_resampled))
    if f.shape != m.shape:
        raise ValueError("moving_resampled must be on the fixed CT's grid")
    hi = float(np.percentile(m, 99.5)) if m.size else 1.0
    m = np.clip(m / (hi if hi > 0 else 1.0), 0.0, 1.0)
    sp = fixed_ct.GetSpacing()
    ijk = _centre_index(fixed_ct, centre_mm)
    plt, fig, axes = _three_panels()
    for ax, (name, fs, aspect), (_, ms, _a) in zip(axes, _views(f, sp, ijk), _views(m, sp, ijk)):
        ax.imshow(np.stack([ms, fs, ms], axis=-1), aspect=aspect, interpolation="nearest")
        ax.set_title(name)
        ax.axis("off")
    return _save_panels(plt, fig, path, title or "fusion (CT green, other magenta)")


def emission_overlay_png(emission: sitk.Image, masks: Mapping[str, sitk.Image],
                         centre_mm: Sequence[float] | None, path: str | Path,
                         title: str | None = None) -> Path:
    """Mask contours over an emission image, three orthogonal slices through ``centre_mm``.

    Parameters
    ----------
    emission
        PET or SPECT image.
    masks
        ROI name → mask; masks not on the emission grid are resampled onto it (nearest neighbour,
        identity transform: they must already be in the emission's frame).
    centre_mm
        Point the slices go through (image centre when None).
    path
        PNG to write.
    title
        Figure title.

    Returns
    -------
    Path
    """
    em = sitk.GetArrayFromImage(_float(emission))
    sp = emission.GetSpacing()
    ijk = _centre_index(emission, centre_mm)
    vmax = float(np.percentile(em, 99.9)) if em.size else 1.0
    plt, fig, axes = _three_panels()
    colours = plt.get_cmap("tab10")
    views = _views(em, sp, ijk)
    for ax, (name, sl, aspect) in zip(axes, views):
        ax.imshow(sl, cmap="gray_r", vmin=0.0, vmax=vmax if vmax > 0 else 1.0, aspect=aspect,
                  interpolation="nearest")
        ax.set_title(name)
        ax.axis("off")
    for n, (roi, mask) in enumerate(masks.items()):
        if mask.GetSize() != emission.GetSize() or not np.allclose(mask.GetOrigin(), emission.GetOrigin()) \
                or not np.allclose(mask.GetSpacing(), emission.GetSpacing()):
            mask = sitk.Resample(mask, emission, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
        ma = sitk.GetArrayFromImage(mask).astype(np.float32)
        for ax, (_, sl, _a) in zip(axes, _views(ma, sp, ijk)):
            if sl.max() > 0.5 and sl.min() < 0.5:
                ax.contour(sl, levels=[0.5], colors=[colours(n % 10)], linewidths=1.0)
        axes[0].plot([], [], color=colours(n % 10), label=roi)
    if masks:
        axes[0].legend(loc="lower left", fontsize=6, frameon=False)
    return _save_panels(plt, fig, path, title or "masks on emission")
