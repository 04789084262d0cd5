"""Atomic outputs: complete or absent, with the permissions of a normally written file (umask applies)."""

from __future__ import annotations

import os
import stat

import pytest

from prrtquant.io import atomic_directory, atomic_path


def test_atomic_outputs_get_umask_permissions_not_tempfile_ones(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "table.tsv") as tmp:
            tmp.write_text("a\n")
        with atomic_directory(tmp_path / "stage") as d:
            (d / "x.txt").write_text("x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "table.tsv").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "stage").stat().st_mode) == 0o755


def test_failed_atomic_directory_leaves_nothing_and_keeps_the_old(tmp_path):
    (tmp_path / "stage").mkdir()
    (tmp_path / "stage" / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_directory(tmp_path / "stage") as d:
            (d / "half.txt").write_text("half")
            raise RuntimeError("killed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stage"]
    assert (tmp_path / "stage" / "old.txt").read_text() == "old"
