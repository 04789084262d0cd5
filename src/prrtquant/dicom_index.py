"""Header-only index of a DICOM export: which series are there, in which study and frame.

Every file is opened up to, not including, its pixel data; files that are not DICOM are ignored (and
counted). A survey, not a conversion: a DICOM file whose header cannot be read, or that has no
SeriesInstanceUID, is listed as a row of its own with the reason in ``note`` (ingest refuses it). No
patient identifier is kept.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pydicom
from pydicom.errors import InvalidDicomError

from .io import is_dicom_file

SERIES_COLUMNS = ["study_instance_uid", "series_instance_uid", "frame_of_reference_uid", "modality",
                  "sop_class_uid", "series_date", "series_time", "series_description", "n_files", "first_file", "note"]


@dataclass
class IndexResult:
    series: pd.DataFrame
    non_dicom: list[str]


def index_dicom(root: str | Path) -> IndexResult:
    """Group every DICOM file below ``root`` by series (reads headers only)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a directory")
    rows: dict[str, dict[str, object]] = {}
    unreadable: list[dict[str, object]] = []
    non_dicom: list[str] = []
    for dirpath, _, filenames in os.walk(root):
        for fn in sorted(filenames):
            p = Path(dirpath) / fn
            rel = str(p.relative_to(root))
            if not is_dicom_file(p):
                non_dicom.append(rel)
                continue
            try:
                ds = pydicom.dcmread(p, stop_before_pixels=True)
                uid = str(getattr(ds, "SeriesInstanceUID", ""))
                problem = "" if uid else "no SeriesInstanceUID"
            except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
                problem = f"unreadable header ({exc})"
            if problem:
                unreadable.append({**{c: "" for c in SERIES_COLUMNS}, "n_files": 1, "first_file": rel,
                                   "note": f"{problem}: not a usable DICOM file"})
                continue
            row = rows.get(uid)
            if row is None:
                rows[uid] = {
                    "study_instance_uid": str(getattr(ds, "StudyInstanceUID", "")),
                    "series_instance_uid": uid,
                    "frame_of_reference_uid": str(getattr(ds, "FrameOfReferenceUID", "")),
                    "modality": str(getattr(ds, "Modality", "")),
                    "sop_class_uid": str(getattr(ds, "SOPClassUID", "")),
                    "series_date": str(getattr(ds, "SeriesDate", "")),
                    "series_time": str(getattr(ds, "SeriesTime", "")),
                    "series_description": str(getattr(ds, "SeriesDescription", "")),
                    "n_files": 1,
                    "first_file": rel,
                    "note": "",
                }
            else:
                row["n_files"] = int(row["n_files"]) + 1  # type: ignore[call-overload]
                if rel < str(row["first_file"]):
                    row["first_file"] = rel
    df = pd.DataFrame(list(rows.values()), columns=SERIES_COLUMNS)
    df = df.sort_values(["series_date", "series_time", "modality"])
    bad = pd.DataFrame(unreadable, columns=SERIES_COLUMNS)
    df = pd.concat([df, bad.sort_values("first_file")], ignore_index=True) if len(bad) else df.reset_index(drop=True)
    return IndexResult(series=df, non_dicom=sorted(non_dicom))
