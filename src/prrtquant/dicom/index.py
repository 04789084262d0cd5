"""Header-only index of a DICOM export: which series are there, in which study and frame.

Every file is opened up to, not including, its pixel data; files that are not DICOM are ignored (and
counted). A survey, not a conversion: a DICOM file whose header cannot be read, or that has no
SeriesInstanceUID, is listed as a row of its own with the reason in ``note`` (ingest refuses it). No
patient identifier is kept.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pydicom

from ..io import is_dicom_file

#: names DICOM files carry in exports
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima", ".dc3")
#: files that exports carry beside the images, never DICOM
NOT_DICOM_SUFFIXES = (".txt", ".xml", ".json", ".tsv", ".csv", ".html", ".htm", ".pdf", ".png", ".jpg", ".jpeg",
                      ".md", ".log", ".ini", ".zip", ".tfm", ".yaml", ".yml", ".exe", ".inf", ".bat", ".sh")
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"  # DICOMDIR


@dataclass(frozen=True)
class FoundFile:
    """One file of an export: ``kind`` is ``dicom`` (Part 10; ``header`` read, or ``problem`` why not),
    ``nifti``, ``suspect`` (not Part 10 but named like the DICOM files beside it; ``problem`` says what it
    is) or ``other`` (anything else, e.g. a README)."""

    path: Path
    kind: str
    header: pydicom.Dataset | None = None
    problem: str = ""


def _looks_like_dicom(p: Path, folder_has_dicom: bool) -> bool:
    """A file that is not Part 10 DICOM but should be: empty, named like DICOM, or named like its DICOM
    neighbours (no suffix, or a number) in a folder of DICOM files."""
    name = p.name.lower()
    if name.startswith(".") or name.endswith(NOT_DICOM_SUFFIXES) or name in ("version", "lockfile", "readme"):
        return False
    if name.endswith(DICOM_SUFFIXES):
        return True
    stem_only = "." not in name or name.rsplit(".", 1)[1].isdigit()
    return folder_has_dicom and stem_only


def _suspect_problem(p: Path) -> str:
    """What a file named like DICOM, without the Part 10 header, is (the message names it)."""
    if not p.is_file():
        return f"{p}: not a readable file (a broken link?) among the DICOM files of {p.parent}"
    if p.stat().st_size == 0:
        return (f"{p}: empty file among the DICOM files of {p.parent} (a slice lost in the export? export the "
                f"series again, or remove the file if it is not one)")
    try:
        ds = pydicom.dcmread(p, stop_before_pixels=True, force=True)
        readable = bool(getattr(ds, "SOPClassUID", None))
    except Exception:  # noqa: BLE001
        readable = False
    if not readable:
        return (f"{p}: not a readable DICOM file, although it sits among the DICOM files of {p.parent} (a damaged "
                f"slice? export the series again, or remove the file)")
    return (f"{p}: DICOM without the Part 10 preamble and file meta information (an old or raw export), not "
            f"supported: export the series again as DICOM files (Part 10)")


def walk_export(root: str | Path) -> Iterator[FoundFile]:
    """Every file below ``root`` (folders walked top-down, files in name order), DICOM headers read once
    (up to, not including, the pixel data)."""
    for dirpath, _, filenames in os.walk(root):
        paths = [Path(dirpath) / fn for fn in sorted(filenames)]
        dicom = {p for p in paths if not p.name.endswith((".nii", ".nii.gz")) and is_dicom_file(p)}
        # does this folder hold images (a DICOMDIR at a CD's root beside README, LICENSE, ... does not count)?
        images = any(p.name.upper() != "DICOMDIR" for p in dicom)
        for p in paths:
            if p.name.endswith((".nii", ".nii.gz")):
                yield FoundFile(p, "nifti")
            elif p in dicom:
                try:
                    yield FoundFile(p, "dicom", pydicom.dcmread(p, stop_before_pixels=True))
                except Exception as exc:  # noqa: BLE001
                    yield FoundFile(p, "dicom", None, str(exc))
            elif _looks_like_dicom(p, images):
                yield FoundFile(p, "suspect", None, _suspect_problem(p))
            else:
                yield FoundFile(p, "other")

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
    for found in walk_export(root):
        p, ds = found.path, found.header
        rel = str(p.relative_to(root))
        if found.kind != "dicom":
            non_dicom.append(rel)
            continue
        uid = str(getattr(ds, "SeriesInstanceUID", "")) if ds is not None else ""
        problem = f"unreadable header ({found.problem})" if ds is None else "" if uid else "no SeriesInstanceUID"
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
