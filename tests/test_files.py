"""vaswani.files: whole-or-nothing writes, the one writer behind checkpoints' metadata, tokenizers, metrics
rewinds and results files."""

from __future__ import annotations

import os
import stat

import pytest

from vaswani.files import atomic_write_text, temporary_beside


def test_a_write_replaces_the_file_whole_and_leaves_nothing_beside_it(tmp_path):
    path = tmp_path / "deep" / "results.json"
    assert atomic_write_text(path, "first\n") == path
    atomic_write_text(path, "second ünïcode\n")
    assert path.read_text(encoding="utf-8") == "second ünïcode\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["results.json"]


def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary(tmp_path, monkeypatch):
    path = tmp_path / "FINAL"
    atomic_write_text(path, "good\n")

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="No space left"):
        atomic_write_text(path, "new\n")
    assert path.read_text() == "good\n" and [p.name for p in tmp_path.iterdir()] == ["FINAL"]


def test_files_get_the_users_usual_permissions_not_mkstemps_private_ones(tmp_path):
    old = os.umask(0o022)
    try:
        path = atomic_write_text(tmp_path / "meta.json", "{}")
        descriptor, temporary = temporary_beside(tmp_path / "x.bin", suffix=".part")
        os.close(descriptor)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert temporary.name.startswith(".x.bin.") and temporary.name.endswith(".part")
    assert stat.S_IMODE(temporary.stat().st_mode) == 0o644
