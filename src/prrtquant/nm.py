"""NM Image Storage multi-frame reconstructions (SPECT) as SimpleITK images in physical space.

Geometry of a RECON TOMO NM object lives in the Detector Information Sequence (first frame's
ImagePositionPatient and the ImageOrientationPatient); frame k lies at
``IPP + k * SpacingBetweenSlices * (row × column)``. A negative SpacingBetweenSlices means the
frames run against the slice normal: the volume is reordered so that the returned image has a
positive z spacing and its direction is right-handed (see shared PITFALLS).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk

Array = np.ndarray


class NMGeometryError(ValueError):
    pass


@dataclass(frozen=True)
class NMValues:
    image: sitk.Image  # float32, stored values (after Real World Value mapping when present)
    units: str  # "CNTS" or "BQML"


def _geometry_source(ds: pydicom.Dataset) -> pydicom.Dataset:
    det = getattr(ds, "DetectorInformationSequence", None)
    if det and "ImagePositionPatient" in det[0] and "ImageOrientationPatient" in det[0]:
        return det[0]
    if "ImagePositionPatient" in ds and "ImageOrientationPatient" in ds:
        return ds
    raise NMGeometryError("no ImagePositionPatient/ImageOrientationPatient in the Detector Information "
                          "Sequence or at top level")


def read_nm(path: str | Path) -> NMValues:
    """Read one multi-frame NM reconstruction; values are stored pixel values (counts), or
    Bq/mL when a Real World Value Mapping in Bq/mL is present."""
    path = Path(path)
    ds = pydicom.dcmread(path)
    try:
        geo = _geometry_source(ds)
    except NMGeometryError as exc:
        raise NMGeometryError(f"{path}: {exc}") from exc
    if "SpacingBetweenSlices" not in ds and "SliceThickness" not in ds:
        raise NMGeometryError(f"{path}: neither SpacingBetweenSlices nor SliceThickness present")
    sbs = float(ds.SpacingBetweenSlices) if "SpacingBetweenSlices" in ds else float(ds.SliceThickness)
    if sbs == 0:
        raise NMGeometryError(f"{path}: SpacingBetweenSlices is 0")
    iop = np.asarray(geo.ImageOrientationPatient, dtype=float)
    row, col = iop[:3], iop[3:]
    normal = np.cross(row, col)
    ipp = np.asarray(geo.ImagePositionPatient, dtype=float)
    arr = ds.pixel_array.astype(np.float32)
    if arr.ndim == 2:
        arr = arr[None]
    n = arr.shape[0]
    if sbs < 0:
        arr = arr[::-1]
        ipp = ipp + (n - 1) * sbs * normal
        sbs = -sbs
    units = "CNTS"
    rwv = getattr(ds, "RealWorldValueMappingSequence", None)
    if rwv:
        item = rwv[0]
        code = item.MeasurementUnitsCodeSequence[0].CodeValue if "MeasurementUnitsCodeSequence" in item else ""
        if str(code).lower() in ("bq/ml", "bqml"):
            arr = arr * float(item.RealWorldValueSlope) + float(getattr(item, "RealWorldValueIntercept", 0.0))
            units = "BQML"
    ps = [float(v) for v in ds.PixelSpacing]  # row spacing, column spacing
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr))
    img.SetSpacing([ps[1], ps[0], sbs])
    img.SetOrigin([float(v) for v in ipp])
    img.SetDirection([float(v) for v in np.stack([row, col, normal], axis=1).ravel()])
    return NMValues(image=img, units=units)
