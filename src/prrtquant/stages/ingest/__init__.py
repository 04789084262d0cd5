"""Ingest: a hospital DICOM export → physical images (NIfTI + JSON sidecar) with provenance.

``ingest(dicom_dir, out_dir, sheet=..., config=...)``

1. indexes every file by header only (non-DICOM files are listed and ignored),
2. classifies series (CT, PT, NM, MR, RTSTRUCT, SEG) and groups them into sessions by study,
3. labels sessions from header facts (radionuclide, injection and acquisition times) and the
   per-patient sheet (which PET study was the IA one, the camera calibration, a weight override):
   ``pet_iv``, ``pet_ia``, ``spect_c{cycle}_{hours}h``, ``mr``, ``ct``,
4. converts: CT in HU, PET in Bq/mL with SUV factors (QIBA rules, :mod:`prrtquant.dicom.pet`), SPECT in
   Bq/mL (counts / (calibration × duration × voxel volume), or as stored), MR as stored; masks from
   RTSTRUCT (exact rasterisation), DICOM-SEG (placed by position) and NIfTI label maps, with ROI
   names mapped to canonical names (unmapped ones are written and listed, never dropped),
5. writes ``out_dir/inventory.tsv`` (one row per written file) atomically: everything is built in
   a temporary folder next to ``out_dir`` and renamed at the end, so a failure leaves nothing.

No patient name, ID or birth date is written anywhere: the patient is known by its pseudonym.
"""

from __future__ import annotations

from ...errors import IngestError
from .inputs import SPECT_SHEET_COLUMNS, IngestConfig, PatientSheet, SpectSheetRow, read_spect_sheet
from .masks import CONTOUR_SLICE_MM, FINE_MASK_MM
from .run import ingest
from .sessions import SeriesRecord, classify, label_sessions, scan

__all__ = [
    "IngestError", "PatientSheet", "SpectSheetRow", "IngestConfig", "read_spect_sheet", "SPECT_SHEET_COLUMNS",
    "FINE_MASK_MM", "CONTOUR_SLICE_MM", "SeriesRecord", "scan", "classify", "label_sessions", "ingest",
]
