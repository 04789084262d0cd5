"""Writing DICOM: deterministic UIDs and empty Part 10 datasets (used by the RTDOSE writer and the phantom).

>>> uid("P01", 1) == uid("P01", 1), uid("P01", 1) == uid("P01", 2)
(True, False)
>>> new_dataset("1.2.840.10008.5.1.4.1.1.481.2", uid("x")).file_meta.TransferSyntaxUID.name
'Explicit VR Little Endian'
"""

from __future__ import annotations

from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from .. import __version__

__all__ = ["UID_ROOT", "uid", "new_dataset"]

#: UID root used for every generated UID (pydicom's root; deterministic with entropy sources: with
#: prefix=None pydicom ignores the entropy sources).
UID_ROOT = "1.2.826.0.1.3680043.8.498."


def uid(*parts: object) -> str:
    """A UID that depends only on ``parts`` (the same parts always give the same UID)."""
    return str(generate_uid(prefix=UID_ROOT, entropy_srcs=[str(p) for p in parts]))


def new_dataset(sop_class: str, sop_uid: str) -> FileDataset:
    """An empty Part 10 dataset (explicit VR little endian) of this SOP class and instance, ISO_IR 100."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = UID_ROOT + "1"
    meta.ImplementationVersionName = f"PRRTQUANT_{__version__}"[:16]
    ds = FileDataset("", Dataset(), file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.SpecificCharacterSet = "ISO_IR 100"
    return ds
