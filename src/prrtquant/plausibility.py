"""Plausibility of header values: what a real patient's export can hold, with a stated range for each.

A value outside its range is either **refused** (the number it feeds cannot be right: ingest stops with
an :class:`ImplausibleValue` naming the file, the tag, the value and the range) or **flagged** (it may be
real but should be looked at: a :class:`Flag` is written into the sidecar, ``sessions.json`` and, through
quantify, the cohort table, whose ``status`` becomes ``flagged``).

=========================================  ===================================  ==========
value                                      range (config ``plausibility``)      outside
=========================================  ===================================  ==========
PatientWeight (kg; > 1000 read as grams)   ``weight_kg`` 30-250                 refused
PatientSize (m; > 3 read as cm)            ``height_m`` 1.2-2.3                 flagged
PET administered activity (68Ga)           ``pet_activity_mbq`` 40-400          refused
SPECT administered activity (177Lu)        ``spect_activity_mbq`` 500-12000     refused
PET injection to scan                      ``pet_uptake_min`` 30-120            flagged
PET injection to scan                      0-360 min                            refused
SPECT injection to scan                    ``spect_hours`` 0.5-400              flagged
SPECT injection to scan                    negative                             refused
sheet weight vs PatientWeight              ``sheet_weight_rtol`` 5 %            flagged
healthy liver SUVbw mean (quantify)        ``liver_suv`` 1-40                   flagged
=========================================  ===================================  ==========

The activity ranges bracket the trial protocols (68Ga-DOTA peptides 100-200 MBq per EANM procedure
guideline, Bozkurt et al. 2017; 177Lu-DOTATATE 7.4 GBq per cycle, NETTER-1, with room for reduced or
split intra-arterial cycles); the uptake window is the PET protocol's (about 60 min, 30-120 min
accepted). Healthy liver on 68Ga-DOTATATE PET has an SUVmean of about 4-10 (IV); the wide band catches a wrong
scale (kBq for Bq, a weight in the wrong unit), not biology. A weight or activity in the wrong unit (grams for kg, Bq or GBq for MBq) lands far outside.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping

from .errors import ImplausibleValue

__all__ = ["ImplausibleValue", "Flag", "PlausibilitySettings", "check_range", "flag_range"]


@dataclass(frozen=True)
class Flag:
    """A value outside the expected range that may still be real: reported, not refused."""

    stage: str
    quantity: str
    value: float
    low: float
    high: float
    unit: str
    where: str   #: session
    source: str  #: file and tag the value comes from

    @property
    def message(self) -> str:
        return (f"{self.stage}: {self.where} {self.quantity} = {self.value:.4g} {self.unit} is outside the expected "
                f"{self.low:g}-{self.high:g} {self.unit} ({self.source})")

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "message": self.message}


def _pair(v: Any, name: str) -> tuple[float, float]:
    lo, hi = (float(x) for x in v)
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"plausibility.{name}: [{lo}, {hi}] is not a range")
    return lo, hi


@dataclass(frozen=True)
class PlausibilitySettings:
    """The config's ``plausibility`` section (ranges as [low, high])."""

    weight_kg: tuple[float, float] = (30.0, 250.0)
    height_m: tuple[float, float] = (1.2, 2.3)
    pet_activity_mbq: tuple[float, float] = (40.0, 400.0)
    spect_activity_mbq: tuple[float, float] = (500.0, 12000.0)
    pet_uptake_min: tuple[float, float] = (30.0, 120.0)
    spect_hours: tuple[float, float] = (0.5, 400.0)
    liver_suv: tuple[float, float] = (1.0, 40.0)
    sheet_weight_rtol: float = 0.05
    #: administrations less than this many days apart are one cycle's, and must then agree
    min_cycle_interval_days: float = 14.0
    #: one cycle's SPECT series may disagree on the injection time by this much (flagged above)
    injection_agreement_min: float = 10.0

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> "PlausibilitySettings":
        cfg = dict(cfg or {})
        names = set(cls.__dataclass_fields__)
        unknown = set(cfg) - names
        if unknown:
            raise ValueError(f"plausibility: unknown setting(s) {sorted(unknown)}")
        kw: dict[str, Any] = {}
        for k, v in cfg.items():
            kw[k] = _pair(v, k) if isinstance(v, (list, tuple)) else float(v)
        return cls(**kw)


def check_range(value: float, rng: tuple[float, float], what: str, unit: str, source: str) -> None:
    """Refuse ``value`` outside ``rng`` (:class:`ImplausibleValue` naming ``source`` and the range)."""
    lo, hi = rng
    if not (math.isfinite(value) and lo <= value <= hi):
        raise ImplausibleValue(f"{source}: {what} {value:g} {unit} is outside the plausible {lo:g}-{hi:g} {unit} "
                               f"(config plausibility; a wrong unit or a typing error?)")


def flag_range(value: float, rng: tuple[float, float], quantity: str, unit: str, where: str,
               source: str, stage: str = "ingest") -> list[Flag]:
    """``[Flag]`` when ``value`` lies outside ``rng``, else ``[]``."""
    lo, hi = rng
    if math.isfinite(value) and lo <= value <= hi:
        return []
    return [Flag(stage, quantity, float(value), lo, hi, unit, where, source)]
