"""CLI end to end on tiny, really fine-tuned Llama/Qwen2 pairs: compress → info → merge → logits."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from prinmix import api
from prinmix.algorithms.budget import budget_bits
from prinmix.cli import main

FAST = ["--nsamples", "8", "--seqlen", "64"]


def _logits(path, ids):
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def probe_ids():
    return torch.randint(3, 400, (3, 48), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("method,closeness", [("prinmix", 0.25), ("deltacome", 0.6), ("lowrank", 0.8),
                                              ("bitdelta", 0.8)])
def test_compress_merge_every_method(tiny_pair, tmp_path, capsys, probe_ids, method, closeness):
    base, ft = tiny_pair("llama", "bf16")
    delta = tmp_path / f"{method}.delta"
    assert main(["compress", str(base), str(ft), "-o", str(delta), "--method", method, "--ratio", "1/16", *FAST]) == 0
    out = capsys.readouterr().out
    assert "ratio achieved" in out and str(delta) in out

    assert main(["info", str(delta), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["method"] == method and info["file_bytes"] == delta.stat().st_size
    assert info["matrices"], "no linear was compressed"
    # every blob within the ratio its plan gave the linears (α' of the whole-delta split, = α for BitDelta)
    linear_alpha = api.load_delta(delta).stats["whole"]["linear_ratio"]
    for name, m in info["matrices"].items():
        allowed = budget_bits(linear_alpha, *m["shape"])
        slack = 5 * 8 if method == "bitdelta" else 0     # BitDelta: 1 bit/entry + a fixed scale/header
        assert 8 * m["bytes"] <= allowed + slack, name
    assert sum(m["bytes"] for m in info["matrices"].values()) == info["linear_bytes"]

    merged = tmp_path / f"merged-{method}"
    assert main(["merge", str(base), str(delta), "-o", str(merged)]) == 0
    lb, lf, lm = (_logits(p, probe_ids) for p in (base, ft, merged))
    assert (lm - lf).norm() < closeness * (lb - lf).norm(), method


def test_qwen2_fp32_and_human_info(tiny_pair, tmp_path, capsys, probe_ids):
    base, ft = tiny_pair("qwen2", "fp32")
    delta = tmp_path / "q.delta"
    assert main(["compress", str(base), str(ft), "-o", str(delta), "--ratio", "16x", *FAST]) == 0
    assert main(["info", str(delta)]) == 0
    text = capsys.readouterr().out
    assert "prinmix" in text and "q_proj" in text
    merged = tmp_path / "m"
    assert main(["merge", str(base), str(delta), "-o", str(merged)]) == 0
    lb, lf, lm = (_logits(p, probe_ids) for p in (base, ft, merged))
    assert (lm - lf).norm() < 0.25 * (lb - lf).norm()


def test_merge_refuses_non_empty_output(tiny_pair, tmp_path, capsys):
    base, ft = tiny_pair("llama", "fp32")
    delta = tmp_path / "l.delta"
    assert main(["compress", str(base), str(ft), "-o", str(delta), "--method", "lowrank"]) == 0
    out = tmp_path / "occupied"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    assert main(["merge", str(base), str(delta), "-o", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "user data"


def test_info_into_a_closed_pipe_exits_quietly(tiny_pair, tmp_path, monkeypatch):
    """`prinmix info x.delta | head -1`: the reader is gone; exit 141 without a traceback."""
    import os

    base, ft = tiny_pair("llama", "fp32")
    delta = tmp_path / "l.delta"
    assert main(["compress", str(base), str(ft), "-o", str(delta), "--method", "lowrank"]) == 0
    read_end, write_end = os.pipe()
    os.close(read_end)                                   # nobody reads: every write fails with EPIPE
    closed = os.fdopen(write_end, "w", buffering=1)
    monkeypatch.setattr("sys.stdout", closed)
    assert main(["info", str(delta)]) == 141
