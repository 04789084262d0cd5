"""Radionuclide data used across prrtquant (one place, with sources).

Half-lives: NNDC/ENSDF evaluated values as tabulated by the DDEP (Laboratoire National Henri Becquerel):
68Ga 67.71 min (LNHB 2012), 177Lu 6.647 d (DDEP 2013, 6.6463 d rounded as commonly used in
dosimetry guidance, EANM/MIRD 26). The other PET nuclides a DICOM header may name (:data:`IN_DICOM`,
recognised to read a PET's half-life and to refuse what is not ours) from NNDC/ENSDF; F-18 109.77 min
as used by scanners and QIBA.

>>> round(decay_factor("Ga-68", 67.71 * 60), 6)
0.5
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Radionuclide:
    name: str
    half_life_s: float
    positron_fraction: float | None
    # DICOM Radionuclide Code Sequence (SNOMED CT, PS3.16 CID 18 "Isotopes in Radiopharmaceuticals")
    code_value: str
    code_meaning: str
    #: every code value that names it in a Radionuclide Code Sequence (CID 4020: SRT and SNOMED CT)
    codes: tuple[str, ...] = ()
    #: element as in the code meaning ("gallium") and mass number, to read free-text names
    element: str = ""
    mass: int = 0

    @property
    def decay_constant_per_s(self) -> float:
        return math.log(2.0) / self.half_life_s

    @property
    def half_life_h(self) -> float:
        return self.half_life_s / 3600.0


GA68 = Radionuclide("Ga-68", 67.71 * 60.0, 0.8911, "35337001", "^68^Gallium", ("C-131A3", "35337001"),
                   "gallium", 68)
LU177 = Radionuclide("Lu-177", 6.647 * 86400.0, None, "447553000", "^177^Lutetium", ("447553000",),
                     "lutetium", 177)

#: The nuclides prrtquant quantifies.
RADIONUCLIDES: dict[str, Radionuclide] = {r.name: r for r in (GA68, LU177)}


def _other(name: str, half_life_s: float, srt: str, snomed: str, element: str, mass: int) -> Radionuclide:
    return Radionuclide(name, half_life_s, None, snomed, f"^{mass}^{element.capitalize()}", (srt, snomed),
                        element, mass)


#: Every nuclide a DICOM PET/NM header is recognised to name (ours first).
IN_DICOM: tuple[Radionuclide, ...] = (
    GA68, LU177,
    _other("C-11", 20.364 * 60.0, "C-105A1", "40565003", "carbon", 11),
    _other("N-13", 9.965 * 60.0, "C-107A1", "21576001", "nitrogen", 13),
    _other("O-15", 122.24, "C-B1038", "129504001", "oxygen", 15),
    _other("F-18", 6586.2, "C-111A1", "77004003", "fluorine", 18),
    _other("Cu-64", 12.701 * 3600.0, "C-127A2", "3932008", "copper", 64),
    _other("Ge-68", 270.95 * 86400.0, "C-128A2", "53315004", "germanium", 68),
    _other("Rb-82", 1.2575 * 60.0, "C-159A2", "79197006", "rubidium", 82),
    _other("Zr-89", 78.41 * 3600.0, "C-168A4", "63360001", "zirconium", 89),
    _other("I-124", 4.1760 * 86400.0, "C-114A5", "40937006", "iodine", 124),
)
_SYMBOLS = {"c": "carbon", "n": "nitrogen", "o": "oxygen", "f": "fluorine", "cu": "copper",
            "ga": "gallium", "ge": "germanium", "rb": "rubidium", "zr": "zirconium", "i": "iodine",
            "lu": "lutetium"}


def from_name(text: str) -> Radionuclide | None:
    """The nuclide a free-text name means: '^18^Fluorine', 'F-18', '18F', 'Fluorine-18', 'Ga68' ...

    >>> from_name("^68^Gallium").name, from_name("177Lu").name, from_name("Tc-99m")
    ('Ga-68', 'Lu-177', None)
    """
    t = text.lower().replace("^", " ")
    mass_m = re.search(r"\d+", t)
    word_m = re.search(r"[a-z]+", t)
    if not mass_m or not word_m:
        return None
    mass, word = int(mass_m.group()), _SYMBOLS.get(word_m.group(), word_m.group())
    return next((n for n in IN_DICOM if n.mass == mass and n.element == word), None)


def from_code(code_value: str) -> Radionuclide | None:
    """The nuclide of a CID 4020 code value (SRT or SNOMED CT)."""
    return next((n for n in IN_DICOM if code_value in n.codes), None)


def from_half_life(half_life_s: float, rel_tol: float = 0.01) -> Radionuclide | None:
    """The first known nuclide whose half-life is within ``rel_tol`` of ``half_life_s``."""
    return next((n for n in IN_DICOM if abs(half_life_s - n.half_life_s) <= rel_tol * n.half_life_s), None)


def get(name: str) -> Radionuclide:
    """One of prrtquant's own nuclides (:data:`RADIONUCLIDES`) by name or alias; KeyError otherwise."""
    key = name.replace("^", "").strip()
    aliases = {"68Ga": "Ga-68", "Ga68": "Ga-68", "177Lu": "Lu-177", "Lu177": "Lu-177"}
    key = aliases.get(key, key)
    if key not in RADIONUCLIDES:
        raise KeyError(f"unknown radionuclide {name!r}; known: {sorted(RADIONUCLIDES)}")
    return RADIONUCLIDES[key]


def decay_factor(name: str, seconds: float) -> float:
    """Fraction of activity left after ``seconds``."""
    return math.exp(-get(name).decay_constant_per_s * seconds)
