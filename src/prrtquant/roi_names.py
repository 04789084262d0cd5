"""Clinical ROI names → canonical names (liver, liver_left, lesion_1, kidney_right, ...).

A mapping is a list of (canonical pattern, regular expression) pairs tried in order; the first
full match (case-insensitive, after trimming) wins. Canonical patterns may use ``{n}``, filled
from the regular expression's group named ``n``. Sites can extend or replace the defaults in
the config (``roi_map``). Names that match nothing stay unmapped and are reported, never dropped.

>>> m = RoiMapper()
>>> [m.canonical(s) for s in ["Rt lobe", "Target 3", "Kidney L", "SPLEEN", "Extrahep met 1", "heart"]]
['liver_right', 'lesion_3', 'kidney_left', 'spleen', 'extrahepatic_1', None]
"""

from __future__ import annotations

import re
from typing import Iterable, Mapping

_L = r"(l|lt|left|links|sin(istra)?)"
_R = r"(r|rt|right|rechts|dex(tra)?)"
_SEP = r"[\s_.\-]*"
_NUM = r"[\s_#.\-]*(?P<n>\d+)"

DEFAULT_ROI_MAP: list[tuple[str, str]] = [
    ("extrahepatic_{n}", rf"(extra{_SEP}hep(atic)?|ehd|eh){_SEP}(les(ion)?|met(astasis)?|node|lesion)?{_NUM}"),
    ("lesion_{n}", rf"(lesion|les|target|tumou?r|met(astasis)?|tl|gtv|liver{_SEP}(les(ion)?|met)){_NUM}"),
    ("liver_left", rf"({_L}{_SEP}(liver{_SEP})?lobe|(liver{_SEP})?lobe{_SEP}{_L}|liver{_SEP}{_L}|{_L}{_SEP}liver)"),
    ("liver_right", rf"({_R}{_SEP}(liver{_SEP})?lobe|(liver{_SEP})?lobe{_SEP}{_R}|liver{_SEP}{_R}|{_R}{_SEP}liver)"),
    ("liver", rf"(whole{_SEP})?(liver|leber|foie|hepar)({_SEP}(total|whole))?"),
    ("kidney_left", rf"(kidney|nier(e)?|rein){_SEP}{_L}|{_L}{_SEP}(kidney|nier(e)?|rein)"),
    ("kidney_right", rf"(kidney|nier(e)?|rein){_SEP}{_R}|{_R}{_SEP}(kidney|nier(e)?|rein)"),
    ("spleen", r"spleen|milz|rate|lien"),
    ("bone_marrow", rf"(bone{_SEP})?marrow|red{_SEP}marrow|(l2{_SEP}(-|to)?{_SEP}l4)({_SEP}(marrow|vertebrae))?|bm"),
]


class RoiMapper:
    def __init__(self, extra: Mapping[str, Iterable[str]] | None = None, replace_defaults: bool = False):
        rules: list[tuple[str, str]] = []
        for canonical, patterns in (extra or {}).items():
            for p in patterns:
                rules.append((canonical, p))
        if not replace_defaults:
            rules += DEFAULT_ROI_MAP
        self.rules = [(c, re.compile(p, re.IGNORECASE)) for c, p in rules]

    def canonical(self, name: str) -> str | None:
        s = " ".join(name.strip().split())
        for canonical, rx in self.rules:
            m = rx.fullmatch(s)
            if m:
                if "{n}" in canonical:
                    n = m.groupdict().get("n")
                    if n is None:
                        continue
                    return canonical.replace("{n}", str(int(n)))
                return canonical
        return None


def numbered(rois: Iterable[str], prefix: str) -> list[str]:
    """The ROI names ``{prefix}N`` among ``rois`` in reading order (N ascending; names without a number last).

    >>> numbered(["lesion_10", "liver", "lesion_2", "lesion_1"], "lesion_")
    ['lesion_1', 'lesion_2', 'lesion_10']
    """
    def key(name: str) -> tuple[int, str]:
        head, _, tail = name.rpartition("_")
        return (int(tail), head) if tail.isdigit() else (10**6, name)

    return sorted((str(r) for r in rois if str(r).startswith(prefix)), key=key)
