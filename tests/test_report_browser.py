"""The patient page in a real browser: headless Chromium (Debian's package, installed here when missing) loads
each bundled patient's page, builds the tables (decision, lesions, lobar T/N, dosimetry, registration QC) and
draws them: the rendered page is not blank and shows the tables' grid lines.

Needs root to install Chromium with apt (like tests/test_slurm.py installs SLURM); about a minute the first
time on a fresh machine, a few seconds once installed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from conftest import COHORT

TABLE_IDS = ("decision", "lesions", "dosimetry", "registration_qc")


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if os.geteuid() != 0:
        pytest.fail("Chromium is not installed and installing it (apt-get install chromium) needs root")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    r = subprocess.run(["apt-get", "install", "-y", "-q", "chromium"], capture_output=True, text=True, env=env,
                       timeout=900)
    if r.returncode != 0:  # the package lists may be stale on a fresh machine
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, text=True, env=env, timeout=600)
        r = subprocess.run(["apt-get", "install", "-y", "-q", "chromium"], capture_output=True, text=True, env=env,
                           timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    found = shutil.which("chromium")
    assert found, "apt-get installed chromium but it is not on PATH"
    return found


def _browser(chromium: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--no-first-run", *args], capture_output=True, text=True, timeout=120)


class _Dom(HTMLParser):
    """Tables (by id) of the DOM the browser built, with their row and cell counts."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[int]] = {}
        self._id: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "table":
            self._id = str(dict(attrs).get("id"))
            self.tables[self._id] = []
        elif tag == "tr" and self._id is not None:
            self.tables[self._id].append(0)
        elif tag in ("td", "th") and self._id is not None and self.tables[self._id]:
            self.tables[self._id][-1] += 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self._id = None


@pytest.mark.slow
@pytest.mark.parametrize("patient", COHORT)
def test_patient_page_renders_its_tables(cohort_workflow_run, tmp_path, patient):
    chromium = _chromium()
    page = Path(cohort_workflow_run["results"]) / patient / "report" / f"{patient}.html"
    dom = _browser(chromium, "--dump-dom", page.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    parsed = _Dom()
    parsed.feed(dom.stdout)
    for table in TABLE_IDS:
        rows = parsed.tables.get(table)
        assert rows and len(rows) >= 2 and min(rows) >= 2, (patient, table, rows)  # header + data, >= 2 cells
    shot = tmp_path / f"{patient}.png"
    r = _browser(chromium, f"--screenshot={shot}", "--window-size=1250,1600", page.as_uri())
    assert r.returncode == 0 and shot.is_file(), r.stderr[-2000:]
    import matplotlib.image

    img = np.asarray(matplotlib.image.imread(shot))[..., :3]
    assert img.shape[:2] == (1600, 1250)
    grey = np.all(np.abs(img - 0xBB / 255.0) < 0.03, axis=-1)  # the tables' #bbb cell borders
    lines = int((grey.mean(axis=1) > 0.2).sum())  # pixel rows that are mostly border: horizontal grid lines
    assert lines >= 10, f"{patient}: {lines} table grid lines drawn"
    assert (img.mean(axis=-1) < 0.5).mean() > 0.005, f"{patient}: the page looks blank"  # dark text drawn
