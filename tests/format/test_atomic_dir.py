"""atomic_directory: the output appears whole or not at all, and a replaced directory survives failures."""

from __future__ import annotations

import pytest

from prinmix.format.atomic_dir import atomic_directory


def test_new_directory_appears_only_on_success(tmp_path):
    out = tmp_path / "missing_parent" / "out"
    with atomic_directory(out) as tmp:
        (tmp / "a.txt").write_text("new")
        assert not out.exists() and tmp.parent == out.parent          # a sibling: same filesystem
    assert (out / "a.txt").read_text() == "new"
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]     # no temporary left behind


def test_failure_keeps_the_old_directory_and_cleans_up(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_directory(out) as tmp:
            (tmp / "half.txt").write_text("half")
            raise RuntimeError("boom")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_success_replaces_the_old_directory(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with atomic_directory(out) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in out.iterdir()] == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
