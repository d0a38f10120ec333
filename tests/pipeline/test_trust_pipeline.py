"""Issue 13 (files): no command destroys an input, no silent wrong result, one line instead of a traceback,
outputs with the modes the umask asks for. Tiny llama pair; lowrank needs no calibration, so most runs
take well under a second."""

from __future__ import annotations

import json
import os
import shutil
import stat
import struct
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from prinmix import api
from prinmix.api import CalibrationConfig
from prinmix.checkpoint.reader import SAMPLE_CHUNK_BYTES, SAMPLE_CHUNKS, CheckpointReader
from prinmix.cli import main
from prinmix.pipeline import compress

Q = "model.layers.0.self_attn.q_proj.weight"
FAST = ["--nsamples", "8", "--seqlen", "64"]


def _fails(capsys, argv, *needles):
    capsys.readouterr()
    assert main(argv) == 2, argv
    err = capsys.readouterr().err.strip()
    assert "prinmix: error:" in err, err
    err = err[err.rindex("prinmix: error:"):]  # after the progress bar, if any
    assert "\n" not in err and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


def _tree(path: Path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture
def pair(tiny_pair, tmp_path):
    """Private copies of the tiny llama fp32 pair (tests may edit them)."""
    base, ft = tiny_pair("llama", "fp32")
    return shutil.copytree(base, tmp_path / "base"), shutil.copytree(ft, tmp_path / "ft")


def _edit(model_dir: Path, name: str, fn) -> None:
    path = model_dir / "model.safetensors"
    sd = load_file(path)
    fn(sd[name])
    save_file(sd, path, metadata={"format": "pt"})


# ------------------------------------------------------------------ 2. inputs never destroyed
def test_no_command_destroys_an_input(pair, tmp_path, capsys):
    base, ft = pair
    delta_dir = tmp_path / "deltas"
    delta = delta_dir / "x.delta"
    assert main(["compress", str(base), str(ft), "-o", str(delta), "--method", "lowrank"]) == 0
    before = {p: _tree(p) for p in (base, ft, delta_dir)}
    _fails(capsys, ["compress", str(base), str(ft), "-o", str(ft / "model.safetensors"), "--method", "lowrank"],
           "inside the input")
    _fails(capsys, ["compress", str(base), str(ft), "-o", str(base / "config.json"), "--method", "lowrank"],
           "inside the input")
    _fails(capsys, ["merge", str(base), str(delta), "-o", str(base), "--force"], "is an input")
    _fails(capsys, ["merge", str(base), str(delta), "-o", str(delta_dir), "--force"], "holds the input")
    _fails(capsys, ["export-lora", str(base), str(delta), "-o", str(base), "--force", "--allow-lossy"], "is an input")
    _fails(capsys, ["report", str(delta), "-o", str(base)], "holds other files")  # BASE is no input of report
    _fails(capsys, ["report", str(delta), "-o", str(base), "--base", str(base), "--finetuned", str(ft)], "is an input")
    _fails(capsys, ["eval", str(base), str(delta), "-o", str(base / "results.json")], "inside the input")
    assert {p: _tree(p) for p in (base, ft, delta_dir)} == before


def test_force_replaces_only_a_previous_merge(pair, tmp_path, capsys):
    base, ft = pair
    delta = tmp_path / "x.delta"
    assert main(["compress", str(base), str(ft), "-o", str(delta), "--method", "lowrank"]) == 0
    user_dir = tmp_path / "mine"
    user_dir.mkdir()
    (user_dir / "notes.txt").write_text("mine")
    _fails(capsys, ["merge", str(base), str(delta), "-o", str(user_dir), "--force"], "notes.txt")
    assert (user_dir / "notes.txt").read_text() == "mine"
    out = tmp_path / "merged"
    assert main(["merge", str(base), str(delta), "-o", str(out)]) == 0
    assert main(["merge", str(base), str(delta), "-o", str(out), "--force"]) == 0  # its own earlier output
    _fails(capsys, ["export-lora", str(base), str(delta), "-o", str(out), "--force", "--allow-lossy"],
           "holds other files")


# ------------------------------------------------------------------ 3. no silent wrong results
def test_large_delta_entry_is_stored_finite_by_every_method(pair, tmp_path):
    base, ft = pair
    _edit(ft, Q, lambda t: t.__setitem__((3, 5), 1e5))
    for method in ("lowrank", "bitdelta", "deltacome", "prinmix"):
        path = tmp_path / f"{method}.delta"
        api.compress(base, ft, path, method=method, calibration=CalibrationConfig(nsamples=8, seqlen=64))
        delta = api.load_delta(path)
        dw = delta.matrices[Q].reconstruct(torch.float32)
        assert bool(torch.isfinite(dw).all()), method
        if method != "bitdelta":  # BitDelta spreads mean|ΔW| over every entry by design
            assert abs(float(dw[3, 5]) - 1e5) < 1e3, (method, float(dw[3, 5]))
        merged = api.merge(base, path, tmp_path / f"m-{method}")
        assert all(bool(torch.isfinite(t).all()) for t in load_file(merged / "model.safetensors").values())


def _compress_interrupted(base, ft, out, monkeypatch):
    """Run compress until its final write (which fails), leaving every layer's resume part behind."""
    def crash(*a, **k):
        raise KeyboardInterrupt
    with monkeypatch.context() as m:
        m.setattr("prinmix.pipeline.compress.save_delta", crash)
        with pytest.raises(KeyboardInterrupt):
            api.compress(base, ft, out, method="lowrank")
    parts = sorted(out.parent.glob(f".{out.name}.partial-*/layer_*.safetensors"))
    assert parts
    return parts


@pytest.mark.parametrize("damage", ["flip", "truncate", "metadata"])
def test_damaged_resume_part_is_recomputed(pair, tmp_path, monkeypatch, damage):
    base, ft = pair
    reference = tmp_path / "ref.delta"
    api.compress(base, ft, reference, method="lowrank")
    out = tmp_path / "out.delta"
    part = _compress_interrupted(base, ft, out, monkeypatch)[0]
    data = bytearray(part.read_bytes())
    if damage == "flip":
        data[-3] ^= 0x40  # inside the last linear blob: a float16 factor entry
        part.write_bytes(bytes(data))
    elif damage == "truncate":
        part.write_bytes(bytes(data[: len(data) // 2]))
    else:  # a shape in the part's metadata, same length so the header stays valid
        at = data.index(b'"shapes"')
        at = data.index(b"64", at)
        data[at:at + 2] = b"46"
        part.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="compressing layer 0 again"):
        api.compress(base, ft, out, method="lowrank")
    assert out.read_bytes() == reference.read_bytes()


def _unsampled_offset(length: int, itemsize: int) -> int:
    """A byte offset of a tensor of LENGTH bytes that content_hash's sampling never reads."""
    span = length - SAMPLE_CHUNK_BYTES
    offset = span // (SAMPLE_CHUNKS - 1) // 2  # halfway between the first two sampled chunks
    assert SAMPLE_CHUNK_BYTES <= offset < span // (SAMPLE_CHUNKS - 1)
    return offset - offset % itemsize


def test_fine_tune_changed_in_unsampled_bytes_does_not_reuse_stale_parts(pair, tmp_path, monkeypatch):
    base, ft = pair
    out = tmp_path / "out.delta"
    _compress_interrupted(base, ft, out, monkeypatch)
    sampled_before = CheckpointReader(ft).content_hash()
    path = ft / "model.safetensors"
    with open(path, "rb") as f:
        header_len = struct.unpack("<Q", f.read(8))[0]
        begin, end = json.loads(f.read(header_len))[Q]["data_offsets"]
    at = 8 + header_len + begin + _unsampled_offset(end - begin, 4)
    data = bytearray(path.read_bytes())
    value = struct.unpack_from("<f", data, at)[0]
    struct.pack_into("<f", data, at, value + 0.5)
    path.write_bytes(bytes(data))
    assert CheckpointReader(ft).content_hash() == sampled_before, "the edit must be invisible to sampling"

    api.compress(base, ft, out, method="lowrank")
    fresh = tmp_path / "fresh.delta"
    api.compress(base, ft, fresh, method="lowrank", resume=False)
    assert out.read_bytes() == fresh.read_bytes()


# ------------------------------------------------------------------ 4. one line, and inputs checked first
def test_inf_in_final_norm_is_found_before_any_layer(pair, tmp_path, capsys, monkeypatch):
    base, ft = pair
    _edit(ft, "model.norm.weight", lambda t: t.__setitem__(0, float("inf")))
    calls = []
    real = compress.write_layer_part
    monkeypatch.setattr(compress, "write_layer_part", lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    _fails(capsys, ["compress", str(base), str(ft), "-o", str(tmp_path / "x.delta"), "--method", "lowrank"],
           "model.norm.weight", "NaN/Inf")
    assert calls == []


@pytest.mark.parametrize("method", ["lowrank", "prinmix"])
def test_huge_finite_entry_gives_one_line(pair, tmp_path, capsys, method):
    base, ft = pair
    _edit(ft, Q, lambda t: t.__setitem__((3, 5), 3e38))
    _fails(capsys, ["compress", str(base), str(ft), "-o", str(tmp_path / "x.delta"), "--method", method, *FAST],
           "3e+38")
    assert not (tmp_path / "x.delta").exists()


def test_disk_full_and_unwritable_outputs_give_one_line(pair, tmp_path, capsys, monkeypatch):
    base, ft = pair
    delta = tmp_path / "x.delta"

    def full(*a, **k):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                              'message: "No space left on device" })')
    with monkeypatch.context() as m:
        m.setattr("prinmix.format.delta_file.save_file", full)
        _fails(capsys, ["compress", str(base), str(ft), "-o", str(delta), "--method", "lowrank"], "No space left")
    assert not delta.exists() and not list(tmp_path.glob(".x.delta.*.tmp"))
    assert main(["compress", str(base), str(ft), "-o", str(delta), "--method", "lowrank"]) == 0

    def enospc(*a, **k):
        raise OSError(28, "No space left on device", str(tmp_path / "m" / "model-00001.safetensors"))
    with monkeypatch.context() as m:
        m.setattr("prinmix.format.hf_checkpoint.save_file", enospc)  # the shard writer
        _fails(capsys, ["merge", str(base), str(delta), "-o", str(tmp_path / "m")], "No space left", "model-00001")
    assert not (tmp_path / "m").exists()

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    _fails(capsys, ["compress", str(base), str(ft), "-o", str(blocker / "x.delta"), "--method", "lowrank"],
           str(blocker))
    _fails(capsys, ["compress", str(base), str(ft), "-o", str(tmp_path / "y.delta"), "--offload",
                    str(blocker / "offload"), *FAST], str(blocker))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_output_gives_one_line(pair, tmp_path, capsys):
    base, ft = pair
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        _fails(capsys, ["compress", str(base), str(ft), "-o", str(ro / "x.delta"), "--method", "lowrank"], str(ro))
    finally:
        ro.chmod(0o755)


# ------------------------------------------------------------------ 5. permissions
def test_outputs_respect_the_umask(pair, tmp_path):
    base, ft = pair
    old = os.umask(0o022)
    try:
        delta = tmp_path / "x.delta"
        api.compress(base, ft, delta, method="lowrank")
        merged = api.merge(base, delta, tmp_path / "merged")
    finally:
        os.umask(old)
    assert stat.S_IMODE(delta.stat().st_mode) == 0o644
    assert stat.S_IMODE(merged.stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in merged.iterdir()} == {0o644}
