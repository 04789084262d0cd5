"""DICOM RT Dose export of a dose map."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from .. import __version__
from .write import new_dataset, uid

__all__ = ["RTDOSE_STORAGE", "write_rtdose"]

Array = np.ndarray

# --------------------------------------------------------------------------- DICOM RTDOSE

RTDOSE_STORAGE = "1.2.840.10008.5.1.4.1.1.481.2"


def write_rtdose(dose: sitk.Image, path: str | Path, frame_of_reference_uid: str, *, patient_name: str = "anonymous",
                 patient_id: str = "anonymous", study_instance_uid: str | None = None,
                 series_description: str = "177Lu absorbed dose", uid_seed: Sequence[object] = (),
                 content_datetime: dt.datetime | None = None, comment: str = "") -> Any:
    """Write ``dose`` (Gy) as a DICOM RT Dose object on its own grid (multi-frame, 32-bit unsigned,
    DoseGridScaling = max / (2³² − 1), DoseUnits GY, DoseType PHYSICAL, DoseSummationType PLAN without a
    referenced plan — radionuclide therapy has none). ImagePositionPatient / ImageOrientationPatient
    come from the grid (origin, first two direction columns); frames run along the third direction
    column (reversed if the grid is left-handed) with GridFrameOffsetVector relative to the first
    frame. ``frame_of_reference_uid`` must be that of the SPECT/CT the grid belongs to, so the dose opens
    registered in 3D Slicer (SlicerRT). No identifying data is written beyond ``patient_name`` /
    ``patient_id`` (pass the pseudonym). Returns the pydicom dataset."""
    import pydicom


    arr = np.nan_to_num(sitk.GetArrayFromImage(dose).astype(np.float64), nan=0.0)
    arr = np.maximum(arr, 0.0)
    d = np.asarray(dose.GetDirection(), dtype=float).reshape(3, 3)
    sp = np.asarray(dose.GetSpacing(), dtype=float)
    nz = arr.shape[0]
    ks = list(range(nz))
    if float(np.dot(np.cross(d[:, 0], d[:, 1]), d[:, 2])) < 0:
        ks = ks[::-1]
    frames = arr[ks]
    dmax = float(frames.max())
    scaling = dmax / 4294967295.0 if dmax > 0 else 1.0
    q = np.rint(frames / scaling).astype(np.uint32)
    first = np.asarray(dose.TransformIndexToPhysicalPoint((0, 0, int(ks[0]))), dtype=float)
    normal = np.cross(d[:, 0], d[:, 1])
    offsets = [float(np.dot(np.asarray(dose.TransformIndexToPhysicalPoint((0, 0, int(k)))) - first, normal))
               for k in ks]
    seed = [str(s) for s in uid_seed] or [str(path), repr(dmax)]
    sop = uid("rtdose", *seed)
    ds = new_dataset(RTDOSE_STORAGE, sop)
    now = content_datetime or dt.datetime(2000, 1, 1)
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.StudyInstanceUID = study_instance_uid or uid("rtdose-study", *seed)
    ds.StudyDate = ds.ContentDate = ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.StudyTime = ds.ContentTime = ds.InstanceCreationTime = now.strftime("%H%M%S")
    ds.StudyID = "DOSIMETRY"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.SeriesInstanceUID = uid("rtdose-series", *seed)
    ds.SeriesNumber = 900
    ds.SeriesDescription = series_description[:64]
    ds.Modality = "RTDOSE"
    ds.Manufacturer = "prrtquant"
    ds.SoftwareVersions = __version__
    ds.FrameOfReferenceUID = frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.InstanceNumber = 1
    ds.ImagePositionPatient = [f"{v:.6f}" for v in first]
    ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*d[:, 0], *d[:, 1])]
    ds.PixelSpacing = [f"{sp[1]:.8g}", f"{sp[0]:.8g}"]
    ds.SliceThickness = f"{sp[2]:.8g}"
    ds.NumberOfFrames = nz
    ds.FrameIncrementPointer = pydicom.tag.Tag(0x3004, 0x000C)
    ds.GridFrameOffsetVector = [f"{v:.6f}" for v in offsets]
    ds.Rows, ds.Columns = int(arr.shape[1]), int(arr.shape[2])
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 32
    ds.BitsStored = 32
    ds.HighBit = 31
    ds.PixelRepresentation = 0
    ds.DoseUnits = "GY"
    ds.DoseType = "PHYSICAL"
    ds.DoseSummationType = "PLAN"
    ds.DoseComment = (comment or "177Lu absorbed dose, prrtquant")[:64]
    ds.DoseGridScaling = f"{scaling:.10e}"
    ds.TissueHeterogeneityCorrection = "IMAGE"
    ds.PixelData = np.ascontiguousarray(q).tobytes()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(str(path), enforce_file_format=True)
    return ds


