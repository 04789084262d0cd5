"""Rules for the Radiopharmaceutical Information Sequence (0054,0016): PET conversion and SPECT ingest.

One home for what an item of the sequence means:

* :func:`total_dose_bq`: ``RadionuclideTotalDose`` in Bq or MBq, decided by magnitude;
* :func:`radionuclide_of`: the radionuclide an item names (code sequence, name, half-life);
* :func:`injection_datetime`: the administration date-time from ``RadiopharmaceuticalStartDateTime``
  or ``RadiopharmaceuticalStartTime`` plus the scan date (injection before midnight, scan after
  midnight handled), refused when it lies after the acquisition start;
* :func:`route_of`: intra-arterial or intravenous administration from ``RadiopharmaceuticalRoute``.

>>> import pydicom
>>> ds = pydicom.Dataset()
>>> item = pydicom.Dataset()
>>> item.RadiopharmaceuticalRoute = "Intraarterial"
>>> ds.RadiopharmaceuticalInformationSequence = [item]
>>> route_of(ds)
'IA'
"""

from __future__ import annotations

import datetime
from typing import Callable

import pydicom

from .. import radionuclides
from ..errors import InjectionAfterScanError
from .values import element_value as _get
from .values import number as _number
from .values import parse_date as _parse_date
from .values import parse_datetime as _parse_datetime
from .values import parse_time as _parse_time
from .values import text as _text

__all__ = [
    "INJECTION_AFTER_SCAN_TOLERANCE",
    "InjectionAfterScanError",
    "total_dose_bq",
    "radionuclide_of",
    "injection_datetime",
    "route_of",
]

#: Injection time may lie this far after the acquisition start (dynamic scans started just before
#: the injection); a time-only injection later than that is taken to be on the previous day.
INJECTION_AFTER_SCAN_TOLERANCE = datetime.timedelta(minutes=15)
#: RadionuclideTotalDose below this is read as MBq, from _DOSE_BQ_MIN on as Bq; in between refused.
_DOSE_MBQ_MAX = 2.0e4
_DOSE_BQ_MIN = 1.0e6




def total_dose_bq(value: float) -> tuple[float, str | None]:
    """RadionuclideTotalDose in Bq, and a note when it was read as MBq.

    The unit is told by magnitude (PET IODs use Bq, the NM isotope module MBq): below 2e4 it is
    MBq, from 1e6 on Bq; in between is ambiguous and raises ValueError.

    >>> total_dose_bq(7400.0)
    (7400000000.0, 'dose in MBq converted to Bq (RadionuclideTotalDose 7400)')
    """
    if value < _DOSE_MBQ_MAX:
        return value * 1.0e6, f"dose in MBq converted to Bq (RadionuclideTotalDose {value:g})"
    if value >= _DOSE_BQ_MIN:
        return value, None
    raise ValueError(f"{value:g} is ambiguous (neither a plausible MBq nor Bq value)")


def radionuclide_of(rp: pydicom.Dataset) -> str | None:
    """Radionuclide of a Radiopharmaceutical Information Sequence item ("Ga-68", "Lu-177", ...).

    From the Radionuclide Code Sequence (meaning first, then code value), else the
    Radiopharmaceutical name, else RadionuclideHalfLife; None when nothing identifies it.
    """
    codes = _get(rp, "RadionuclideCodeSequence") or []
    if codes:
        item = codes[0]
        cv = _text(_get(item, "CodeValue"))
        found = radionuclides.from_name(_text(_get(item, "CodeMeaning")) or "") or (
            radionuclides.from_code(cv) if cv else None)
        if found:
            return found.name
    found = radionuclides.from_name(_text(_get(rp, "Radiopharmaceutical")) or "")
    if found:
        return found.name
    hl = _number(_get(rp, "RadionuclideHalfLife"))
    found = radionuclides.from_half_life(hl) if hl else None
    return found.name if found else None


def injection_datetime(rp: pydicom.Dataset, scan_start: datetime.datetime, note: Callable[[str], None],
                       after_scan_tolerance: datetime.timedelta = INJECTION_AFTER_SCAN_TOLERANCE
                       ) -> datetime.datetime:
    """Administration date-time of a Radiopharmaceutical Information Sequence item.

    ``RadiopharmaceuticalStartDateTime`` when it holds a time of day (UTC offset ignored); a
    date-only value combined with ``RadiopharmaceuticalStartTime``; else ``RadiopharmaceuticalStartTime``
    on the scan date, on the previous day when that would lie more than
    :data:`INJECTION_AFTER_SCAN_TOLERANCE` after ``scan_start`` (injection before midnight, scan after).

    Parameters
    ----------
    rp : pydicom.Dataset
        The Radiopharmaceutical Information Sequence item.
    scan_start : datetime.datetime
        Acquisition start the injection is checked against (and whose date a time-only injection takes).
    note : callable
        Called with the text of every fallback or interpretation that was needed, in order.
    after_scan_tolerance : datetime.timedelta
        How far after ``scan_start`` a recorded injection may lie (clock differences between injection
        room and scanner); a time-only injection later than that is taken on the previous day. PET
        (68Ga, scanned about an hour after injection) uses 15 min; SPECT, which may be scanned a few
        minutes short of 24 h after injection, uses 0.

    Returns
    -------
    datetime.datetime
        The injection date-time (naive, local).

    Raises
    ------
    InjectionAfterScanError
        When a recorded injection date-time lies more than the tolerance after ``scan_start``.
    ValueError
        When the start date-time or time cannot be parsed, or neither is recorded.

    >>> rp = pydicom.Dataset()
    >>> rp.RadiopharmaceuticalStartTime = "235000"
    >>> injection_datetime(rp, datetime.datetime(2024, 1, 2, 0, 30), print)
    injection date not recorded: RadiopharmaceuticalStartTime combined with the scan date
    injection time later than scan time of day: injection taken on the previous day (scan after midnight)
    datetime.datetime(2024, 1, 1, 23, 50)
    """
    inj_dt_text = _text(_get(rp, "RadiopharmaceuticalStartDateTime"))
    try:
        inj_dt, inj_tz = _parse_datetime(inj_dt_text)
        # RadiopharmaceuticalStartTime only matters without a full date-time (a redundant one is not read)
        inj_t = _parse_time(_get(rp, "RadiopharmaceuticalStartTime")) if inj_dt is None else None
        inj_date = _parse_date(inj_dt_text[:8]) if inj_dt is None and inj_dt_text else None
    except ValueError as exc:
        raise ValueError(f"radiopharmaceutical start time cannot be parsed ({exc})") from None
    if inj_dt is not None:
        if inj_tz:
            note("UTC offset of RadiopharmaceuticalStartDateTime ignored (all times taken as local)")
        if inj_dt - scan_start > after_scan_tolerance:
            raise InjectionAfterScanError(
                f"RadiopharmaceuticalStartDateTime {inj_dt} is after the acquisition start {scan_start}",
                inj_dt)
        injection = inj_dt
    elif inj_t is not None and inj_date is not None:
        injection = datetime.datetime.combine(inj_date, inj_t)
        note("RadiopharmaceuticalStartDateTime holds only a date: combined with RadiopharmaceuticalStartTime")
        if injection - scan_start > after_scan_tolerance:
            raise InjectionAfterScanError(
                f"injection {injection} is after the acquisition start {scan_start}", injection)
    elif inj_t is not None:
        injection = datetime.datetime.combine(scan_start.date(), inj_t)
        note("injection date not recorded: RadiopharmaceuticalStartTime combined with the scan date")
        if injection - scan_start > after_scan_tolerance:
            injection -= datetime.timedelta(days=1)
            note("injection time later than scan time of day: injection taken on the previous "
                 "day (scan after midnight)")
    else:
        raise ValueError("RadiopharmaceuticalStartDateTime (0018,1078) and RadiopharmaceuticalStartTime "
                         "(0018,1072) missing")
    if injection > scan_start:
        note(f"injection {(injection - scan_start).total_seconds():.0f} s after acquisition start")
    return injection


def route_of(ds: pydicom.Dataset) -> str | None:
    """Administration route of a series: "IA" (intra-arterial), "IV" (intravenous) or None.

    From ``RadiopharmaceuticalRoute`` of the first Radiopharmaceutical Information Sequence item of
    ``ds`` (a series header); None when the sequence or the route is missing or names neither.
    """
    seq = getattr(ds, "RadiopharmaceuticalInformationSequence", None)
    if not seq:
        return None
    r = str(getattr(seq[0], "RadiopharmaceuticalRoute", "")).lower()
    if not r:
        return None
    if "arter" in r or r in ("ia", "i.a."):
        return "IA"
    if "ven" in r or r in ("iv", "i.v."):
        return "IV"
    return None
