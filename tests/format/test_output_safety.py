"""Outputs never overlap inputs; --force replaces only a marked output of the same kind; modes follow the umask."""

from __future__ import annotations

import os
import stat

import pytest
import torch
from safetensors.torch import save_file

from prinmix.errors import PrinmixError
from prinmix.format.atomic_dir import atomic_directory
from prinmix.format.output_safety import (
    MERGED_CHECKPOINT,
    REPORT,
    check_output_directory,
    refuse_input_overlap,
    write_marker,
)


def test_overlap_rules(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    delta = tmp_path / "d" / "x.delta"
    delta.parent.mkdir()
    delta.write_bytes(b"")
    refuse_input_overlap([tmp_path / "out"], [model, delta], "merge")  # disjoint: fine
    refuse_input_overlap([tmp_path / "model-merged"], [model], "merge")  # a sibling with a common prefix
    for out, needle in ((model, "is an input"), (model / "config.json", "inside the input"), (delta, "is an input"),
                        (model / "sub" / "out", "inside the input"), (delta.parent, "holds the input"),
                        (tmp_path, "holds the input"), (tmp_path / "d" / ".." / "model", "is an input")):
        with pytest.raises(PrinmixError, match=needle):
            refuse_input_overlap([out], [model, delta], "merge")


def test_overlap_follows_symlinks(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    link = tmp_path / "link"
    link.symlink_to(model)
    with pytest.raises(PrinmixError, match="is an input"):
        refuse_input_overlap([link], [model], "merge")


def test_force_replaces_only_a_marked_output_of_the_same_kind(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "weights.bin").write_text("user data")
    with pytest.raises(PrinmixError, match="not empty"):
        check_output_directory(out, False, MERGED_CHECKPOINT)
    with pytest.raises(PrinmixError, match="weights.bin"):
        check_output_directory(out, True, MERGED_CHECKPOINT)
    write_marker(out, REPORT)
    with pytest.raises(PrinmixError, match="holds other files"):
        check_output_directory(out, True, MERGED_CHECKPOINT)
    write_marker(out, MERGED_CHECKPOINT)
    check_output_directory(out, True, MERGED_CHECKPOINT)
    check_output_directory(tmp_path / "new", False, MERGED_CHECKPOINT)


@pytest.mark.parametrize("umask,file_mode,dir_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_atomic_directory_respects_the_umask(tmp_path, umask, file_mode, dir_mode):
    old = os.umask(umask)
    try:
        with atomic_directory(tmp_path / "out") as tmp:
            (tmp / "f.txt").write_text("x")
            save_file({"w": torch.ones(2)}, str(tmp / "model.safetensors"))  # safetensors 0.8 makes it 0600
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == dir_mode
    assert {stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "out").iterdir()} == {file_mode}
