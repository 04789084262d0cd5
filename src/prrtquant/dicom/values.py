"""Parsing of DICOM attribute values (text, numbers, DA, TM, DT) shared by the readers.

Tolerant of what real exports contain: bytes from unknown private elements, multi-values,
padding, missing fractions, UTC offsets.
"""

from __future__ import annotations

import datetime
import math
import re
import struct
from typing import Any

from pydicom.dataelem import DataElement
from pydicom.multival import MultiValue


def text(value: Any) -> str | None:
    """Attribute value (str, bytes, number, multi-value) as stripped text; None when empty."""
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).decode("latin-1")
    elif isinstance(value, (list, tuple, MultiValue)):
        if len(value) == 0:
            return None
        value = value[0]
        return text(value)
    s = str(value).strip().strip("\x00").strip()
    if "\\" in s:
        s = s.split("\\")[0].strip()
    return s or None


def number(value: Any) -> float | None:
    """Numeric value from DS/IS/FD/UN (text or 4/8-byte little-endian binary); None when empty."""
    if value is None:
        return None
    if isinstance(value, (list, tuple, MultiValue)):
        return number(value[0]) if len(value) else None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raw = bytes(value) if isinstance(value, (bytes, bytearray)) else None
    s = text(value)
    if s is not None:
        try:
            return float(s)
        except ValueError:
            pass
    if raw is not None and len(raw) in (4, 8):
        v = struct.unpack("<f" if len(raw) == 4 else "<d", raw)[0]
        if math.isfinite(v):
            return float(v)
    raise ValueError(f"not a number: {value!r}")


def parse_date(value: Any) -> datetime.date | None:
    if isinstance(value, datetime.datetime):
        return value.date()
    if isinstance(value, datetime.date):
        return value
    s = text(value)
    if not s:
        return None
    s = s.replace(".", "").replace("-", "").replace("/", "")
    if not re.fullmatch(r"\d{8}", s):
        raise ValueError(f"not a DICOM date: {value!r}")
    return datetime.date(int(s[:4]), int(s[4:6]), int(s[6:8]))


def parse_time(value: Any) -> datetime.time | None:
    if isinstance(value, datetime.time):
        return value
    s = text(value)
    if not s:
        return None
    s = s.replace(":", "")
    m = re.fullmatch(r"(\d{2})(\d{2})?(\d{2})?(?:\.(\d{1,6}))?", s)
    if not m:
        raise ValueError(f"not a DICOM time: {value!r}")
    hh, mm, ss, frac = m.groups()
    sec = min(int(ss or 0), 59)  # leap second 60 -> 59
    return datetime.time(int(hh), int(mm or 0), sec, int((frac or "0").ljust(6, "0")))


def parse_datetime(value: Any) -> tuple[datetime.datetime | None, bool]:
    """DICOM DT -> (naive datetime, had_utc_offset); None when empty or when it holds no time of day."""
    if isinstance(value, datetime.datetime):
        return value.replace(tzinfo=None), value.tzinfo is not None
    s = text(value)
    if not s:
        return None, False
    m = re.fullmatch(r"(\d{8})(\d{2,6}(?:\.\d{1,6})?)?([+-]\d{4})?", s)
    if not m:
        raise ValueError(f"not a DICOM date-time: {value!r}")
    if not m.group(2):
        return None, False  # a date without a time of day cannot place an event in time
    d = parse_date(m.group(1))
    assert d is not None
    t = parse_time(m.group(2))
    assert t is not None
    return datetime.datetime.combine(d, t), m.group(3) is not None


def combine(date: Any, time: Any) -> datetime.datetime | None:
    """A DA and a TM value as one naive datetime; None when either is empty."""
    d, t = parse_date(date), parse_time(time)
    return None if d is None or t is None else datetime.datetime.combine(d, t)


def series_datetime(ds: Any, note: Any = None) -> datetime.datetime | None:
    """SeriesDate + SeriesTime of a dataset; a missing SeriesDate is taken from AcquisitionDate, else
    StudyDate (said through ``note(text)`` when given); None without a SeriesTime or any date.

    Raises ValueError when SeriesDate or SeriesTime cannot be parsed.
    """
    t = parse_time(getattr(ds, "SeriesTime", None))
    d = parse_date(getattr(ds, "SeriesDate", None))
    if t is None:
        return None
    if d is None:
        for kw in ("AcquisitionDate", "StudyDate"):
            try:
                d = parse_date(getattr(ds, kw, None))
            except ValueError:
                d = None
            if d is not None:
                if note is not None:
                    note(f"SeriesDate missing: SeriesTime combined with {kw}")
                break
    return None if d is None else datetime.datetime.combine(d, t)


def element_value(ds: Any, key: Any) -> Any:
    """Value of an attribute of a dataset, by keyword or tag; None when absent."""
    el = ds.get(key, None)
    return el.value if isinstance(el, DataElement) else el
