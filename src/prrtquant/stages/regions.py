"""One definition of the regions measured on an emission grid, shared by quantification and dosimetry.

The registration stage carries every reference mask onto each PET/SPECT grid (``masks.tsv``: session,
roi, kind ``binary`` / ``fractional``, path). On top of those, the healthy liver (whole and per lobe)
is the liver minus the target lesions (every voxel a lesion touches) dilated by ``liver_margin_mm``. Both
stages build their regions here, from the same settings (config section ``quantify``: ``mask_kind`` and
``liver_margin_mm``), so the same region at the same time point holds the same voxels, and therefore
the same activity, in ``cycles.tsv`` and in the dosimetry's ``tac.tsv`` (dosimetry with
``fixed_voi: false``; by default it measures with the fractional kind, the same physical VOI at every
time point).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd
import SimpleITK as sitk

from ..roi_names import numbered
from ..io import read_image
from ..quantify import healthy_liver_mask

__all__ = ["RegionSettings", "HEALTHY_LIVER", "lesion_names", "read_session_masks", "session_regions"]

#: whole organ → its healthy part (lesions removed)
HEALTHY_LIVER = (("liver", "healthy_liver"), ("liver_left", "healthy_liver_left"),
                 ("liver_right", "healthy_liver_right"))


@dataclass(frozen=True)
class RegionSettings:
    """How regions are defined on an emission grid (config ``quantify.mask_kind``, ``quantify.liver_margin_mm``)."""

    mask_kind: str = "binary"      #: masks for means and activities: binary or fractional (partial volume)
    liver_margin_mm: float = 0.0   #: healthy liver = liver minus the lesions dilated by this (mm)

    def __post_init__(self) -> None:
        if self.mask_kind not in ("binary", "fractional"):
            raise ValueError(f"quantify.mask_kind must be binary or fractional, got {self.mask_kind!r}")
        if not (self.liver_margin_mm >= 0):
            raise ValueError(f"quantify.liver_margin_mm must be >= 0, got {self.liver_margin_mm}")

    @classmethod
    def from_config(cls, quantify: Mapping[str, Any] | None) -> "RegionSettings":
        q = dict(quantify or {})
        return cls(mask_kind=str(q.get("mask_kind", "binary")), liver_margin_mm=float(q.get("liver_margin_mm", 0.0)))


def lesion_names(rois: Any) -> list[str]:
    """Target lesions (``lesion_N``) among ROI names, in reading order (N ascending)."""
    return numbered(rois, "lesion_")


def read_session_masks(register_dir: Path, table: pd.DataFrame, session: str, kind: str) -> dict[str, sitk.Image]:
    """The propagated masks of one session and kind, from the registration's ``masks.tsv``."""
    rows = table[(table.session == session) & (table.kind == kind)]
    return {r.roi: read_image(str(Path(register_dir) / r.path)) for r in rows.itertuples()}


def _fractional_healthy(liver: sitk.Image, lesions_frac: list[sitk.Image], lesions_binary: list[sitk.Image],
                        margin_mm: float) -> sitk.Image:
    """Fractional healthy liver: clip(liver − Σ lesion weights, 0, 1), then the margin around the binary lesions."""
    w = sitk.GetArrayFromImage(liver).astype(np.float64)
    for les in lesions_frac:
        w -= sitk.GetArrayViewFromImage(les)
    out = sitk.GetImageFromArray(np.clip(w, 0.0, 1.0).astype(np.float32))
    out.CopyInformation(liver)
    return healthy_liver_mask(out, lesions_binary, margin_mm) if margin_mm > 0 else out


def session_regions(register_dir: Path, table: pd.DataFrame, session: str, settings: RegionSettings,
                    lesions: list[str] | None = None) -> tuple[dict[str, sitk.Image], dict[str, sitk.Image]]:
    """(masks for means and activities, binary masks) of one session, healthy liver included.

    ``lesions``: the lesions removed from the liver (default: every ``lesion_N`` on the grid). Binary kind:
    liver minus the binary lesions dilated by the margin. Fractional kind: the liver weight minus the
    lesions' weights (the part of each voxel that is liver and not lesion), then, with a margin, minus the
    binary lesions dilated by it; so the healthy liver never keeps part of a lesion.
    """
    binary = read_session_masks(register_dir, table, session, "binary")
    means = binary if settings.mask_kind == "binary" else read_session_masks(register_dir, table, session,
                                                                            "fractional")
    names = lesion_names(binary) if lesions is None else lesions
    lesion_masks = [binary[les] for les in names if les in binary]
    for whole, healthy in HEALTHY_LIVER:
        if whole in binary:
            binary[healthy] = healthy_liver_mask(binary[whole], lesion_masks, settings.liver_margin_mm)
            if means is not binary and whole in means:
                means[healthy] = _fractional_healthy(means[whole], [means[les] for les in names if les in means],
                                                     lesion_masks, settings.liver_margin_mm)
    return means, binary
