"""Physical bounds on absolute numbers: what no patient can have is flagged, never reported as a result.

Every stage that writes an absolute 177Lu quantity checks it here:

* ingest: the activity in the SPECT field of view is at most the administered activity decayed to
  the scan, ``A0·exp(−λ·t)``;
* quantify: every region's activity is at most that, so its % of injected activity (at scan time)
  is at most 100, and no region's activity is negative;
* dosimetry: every region's time-integrated activity (TIA) is at most ``A0/λ_phys`` (all of the
  administered activity staying there and decaying only physically), every TIA and dose is ≥ 0.

A measured activity may exceed its bound by ``tolerance`` (relative; config
``physical_bounds.activity_tolerance``, default 10 %: camera calibration, reconstruction and
partial-volume errors) before it is flagged. A :class:`Violation` names the quantity, the region, the
session or cycle, the value, the bound and the source, so a message can say what is wrong with which
series. Stages write violations into a ``bounds_flag`` column and their summary JSON, and with
``on_patient_error: fail`` raise :class:`PhysicalBoundsError` instead of writing anything.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Mapping

from .errors import PhysicalBoundsError

__all__ = ["DEFAULT_TOLERANCE", "Violation", "PhysicalBoundsError", "BoundsSettings", "check_activity",
           "check_tia", "check_non_negative", "flag_text", "raise_if_any"]

DEFAULT_TOLERANCE = 0.10


@dataclass(frozen=True)
class BoundsSettings:
    """The config's ``physical_bounds`` section."""

    activity_tolerance: float = DEFAULT_TOLERANCE

    def __post_init__(self) -> None:
        if not (0.0 <= self.activity_tolerance <= 1.0):
            raise ValueError(f"physical_bounds.activity_tolerance must be in [0, 1], got {self.activity_tolerance}")

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> "BoundsSettings":
        cfg = dict(cfg or {})
        unknown = set(cfg) - {"activity_tolerance"}
        if unknown:
            raise ValueError(f"physical_bounds: unknown setting(s) {sorted(unknown)}")
        return cls(**cfg)


@dataclass(frozen=True)
class Violation:
    """One physically impossible number."""

    stage: str        #: ingest, quantify, dosimetry
    quantity: str     #: e.g. "activity_mbq", "pct_ia", "tia_mbq_h", "dose_kernel_gy"
    region: str       #: region name, or "field_of_view"
    where: str        #: session (time point) or "cycle N"
    value: float
    bound: float      #: the limit that was crossed (upper, or 0 for a lower bound)
    unit: str
    source: str = ""  #: series / file the number comes from

    @property
    def message(self) -> str:
        rel = "above" if self.value > self.bound else "below"
        src = f" ({self.source})" if self.source else ""
        return (f"{self.stage}: {self.where} {self.region} {self.quantity} = {self.value:.4g} {self.unit} is {rel} "
                f"the physical bound {self.bound:.4g} {self.unit}{src}")

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "message": self.message}


def _finite(v: float) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(float(v))


def _check(value: float, upper: float | None, quantity: str, unit: str, stage: str, region: str, where: str,
           source: str) -> list[Violation]:
    """``value`` against 0 and, when given, an upper bound."""
    out: list[Violation] = []
    if not _finite(value):
        return out
    if value < 0:
        out.append(Violation(stage, quantity, region, where, float(value), 0.0, unit, source))
    if upper is not None and value > upper:
        out.append(Violation(stage, quantity, region, where, float(value), upper, unit, source))
    return out


def check_activity(activity_mbq: float, injected_mbq: float, hours_pi: float, decay_constant_per_h: float,
                   tolerance: float, *, stage: str, region: str, where: str, source: str = "") -> list[Violation]:
    """Activity present at the scan (not decay corrected) against the administered activity decayed to it.

    >>> check_activity(50.0, 7400.0, 24.0, 0.0043, 0.1, stage="quantify", region="kidney_left", where="c1_24h")
    []
    >>> v = check_activity(8000.0, 7400.0, 24.0, 0.0043, 0.1, stage="ingest", region="field_of_view", where="c1")
    >>> round(v[0].bound, 1)
    7341.8
    """
    upper = None
    if _finite(injected_mbq) and injected_mbq > 0 and _finite(hours_pi) and _finite(decay_constant_per_h):
        upper = injected_mbq * math.exp(-decay_constant_per_h * max(hours_pi, 0.0)) * (1.0 + tolerance)
    return _check(activity_mbq, upper, "activity_mbq", "MBq", stage, region, where, source)


def check_tia(tia_mbq_h: float, injected_mbq: float, decay_constant_per_h: float, tolerance: float, *,
              stage: str, region: str, where: str, source: str = "") -> list[Violation]:
    """Time-integrated activity against ``A0/λ`` (everything administered staying, physical decay only).

    >>> round(check_tia(2.0e6, 7400.0, 0.0043, 0.1, stage="dosimetry", region="liver", where="cycle 1")[0].bound)
    1893023
    """
    upper = None
    if _finite(injected_mbq) and injected_mbq > 0 and decay_constant_per_h > 0:
        upper = injected_mbq / decay_constant_per_h * (1.0 + tolerance)
    return _check(tia_mbq_h, upper, "tia_mbq_h", "MBq·h", stage, region, where, source)


def check_non_negative(value: float, quantity: str, unit: str, *, stage: str, region: str, where: str,
                       source: str = "") -> list[Violation]:
    """A quantity that cannot be negative (dose, BED, activity, TIA)."""
    return _check(value, None, quantity, unit, stage, region, where, source)


def flag_text(violations: Iterable[Violation]) -> str:
    """The violations of one table row as its ``bounds_flag`` text ("" when there are none)."""
    return "; ".join(f"{v.quantity} {v.value:.4g} {v.unit} > bound {v.bound:.4g}" if v.value > v.bound
                     else f"{v.quantity} {v.value:.4g} {v.unit} < 0" for v in violations)


def raise_if_any(violations: Iterable[Violation], what: str) -> None:
    """Raise :class:`PhysicalBoundsError` listing every violation (for ``on_patient_error: fail``)."""
    vs = list(violations)
    if vs:
        raise PhysicalBoundsError(f"{what}: {len(vs)} physically impossible value(s): "
                                  + "; ".join(v.message for v in vs))
