"""Radionuclide data used across prrtquant (one place, with sources).

Half-lives: NNDC/ENSDF evaluated values as tabulated by the DDEP (Laboratoire National Henri Becquerel):
68Ga 67.71 min (LNHB 2012), 177Lu 6.647 d (DDEP 2013, 6.6463 d rounded as commonly used in
dosimetry guidance, EANM/MIRD 26).

>>> round(decay_factor("Ga-68", 67.71 * 60), 6)
0.5
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Radionuclide:
    name: str
    half_life_s: float
    positron_fraction: float | None
    # DICOM Radionuclide Code Sequence (SNOMED CT, PS3.16 CID 18 "Isotopes in Radiopharmaceuticals")
    code_value: str
    code_meaning: str

    @property
    def decay_constant_per_s(self) -> float:
        return math.log(2.0) / self.half_life_s

    @property
    def half_life_h(self) -> float:
        return self.half_life_s / 3600.0


GA68 = Radionuclide("Ga-68", 67.71 * 60.0, 0.8911, "35337001", "^68^Gallium")
LU177 = Radionuclide("Lu-177", 6.647 * 86400.0, None, "447553000", "^177^Lutetium")

RADIONUCLIDES: dict[str, Radionuclide] = {r.name: r for r in (GA68, LU177)}


def get(name: str) -> Radionuclide:
    key = name.replace("^", "").strip()
    aliases = {"68Ga": "Ga-68", "Ga68": "Ga-68", "177Lu": "Lu-177", "Lu177": "Lu-177"}
    key = aliases.get(key, key)
    if key not in RADIONUCLIDES:
        raise KeyError(f"unknown radionuclide {name!r}; known: {sorted(RADIONUCLIDES)}")
    return RADIONUCLIDES[key]


def decay_factor(name: str, seconds: float) -> float:
    """Fraction of activity left after ``seconds``."""
    return math.exp(-get(name).decay_constant_per_s * seconds)
