"""The delta file: round trip, and the linear deltas' bytes *on disk* (blobs + header entries) meet α."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fixtures.synthetic import calibration_hessian, synthetic_delta
from prinmix.algorithms.budget import budget_bits
from prinmix.algorithms.compress_matrix import compress_matrix
from prinmix.errors import DeltaFormatError
from prinmix.format.delta_file import (
    METADATA_SHA256_FIELD,
    DeltaFile,
    load_delta,
    matrix_header_bytes,
    metadata_digest,
    ratio_within_file,
    save_delta,
)

SHAPES = {"model.layers.0.self_attn.q_proj.weight": (384, 384),   # at 1/32: 4.5 KiB budget, ~400 B header
          "model.layers.0.self_attn.k_proj.weight": (128, 512),
          "model.layers.0.mlp.down_proj.weight": (256, 768),
          "model.layers.10.mlp.experts.7.up_proj.weight": (768, 256)}


def _delta_file(method: str, alpha: float) -> DeltaFile:
    delta = DeltaFile(method, alpha, {"method": method, "ratio": alpha},
                      base_fingerprint={"content_hash": "0" * 64, "model_type": "llama", "n_tensors": 1})
    for k, (name, (h_out, h_in)) in enumerate(SHAPES.items()):
        W = synthetic_delta(h_out, h_in, seed=k)
        H, _ = calibration_hessian(h_in, seed=k)
        delta.matrices[name] = compress_matrix(W, H, ratio_within_file(alpha, name, (h_out, h_in)), method)
    delta.dense["model.norm.weight"] = torch.randn(128).to(torch.bfloat16)
    delta.aux_files["config.json"] = b'{"model_type": "llama"}'
    delta.stats = {"layers": 11, "objective": {n: m.info.get("objective") for n, m in delta.matrices.items()
                                               if m.info.get("objective") is not None}}
    return delta


@pytest.mark.parametrize("method", ["prinmix", "deltacome", "lowrank"])
@pytest.mark.parametrize("alpha", [1 / 16, 1 / 32])
def test_linear_bytes_on_disk_meet_the_ratio(tmp_path, method, alpha):
    delta = _delta_file(method, alpha)
    with_linears = save_delta(delta, tmp_path / "with.delta")
    bare = DeltaFile(delta.method, delta.ratio, delta.params, dense=delta.dense, aux_files=delta.aux_files,
                     base_fingerprint=delta.base_fingerprint, stats={"layers": 11, "objective": {}})
    without_linears = save_delta(bare, tmp_path / "without.delta")
    on_disk = with_linears - without_linears            # measured: what the linear deltas cost in the file
    budget = sum(budget_bits(alpha, *shape) for shape in SHAPES.values()) // 8
    assert on_disk <= budget, (on_disk, budget)
    # the accounting bounds the measurement (up to the 8-byte header alignment), and is not loose by more than
    # the 20-digit offsets and the objective allowance it assumes (≈ 130 B per matrix)
    accounted = delta.linear_bytes() + delta.linear_header_bytes()
    assert on_disk <= accounted + 8 and accounted - on_disk <= 8 + 140 * len(SHAPES), (on_disk, accounted)
    loaded = load_delta(tmp_path / "with.delta")
    assert set(loaded.matrices) == set(SHAPES)
    for name, m in delta.matrices.items():
        assert torch.equal(loaded.matrices[name].to_blob(), m.to_blob())


def test_tiny_matrices_keep_their_whole_budget():
    name = "model.layers.0.self_attn.k_proj.weight"
    assert ratio_within_file(1 / 16, name, (128, 64)) == 1 / 16         # 1 KiB budget < 4 × its header entries
    big = ratio_within_file(1 / 16, name, (4096, 4096))
    reserve_bits = budget_bits(1 / 16, 4096, 4096) - budget_bits(big, 4096, 4096)
    assert reserve_bits == 8 * matrix_header_bytes(name, (4096, 4096))


def _with_vocab(tmp_path):
    delta = _delta_file("prinmix", 1 / 16)
    d_rows = synthetic_delta(40, 64, seed=9)
    idx = torch.tensor(sorted(torch.randperm(300, generator=torch.Generator().manual_seed(0))[:40].tolist()))
    delta.vocab["model.embed_tokens.weight"] = (idx, compress_matrix(d_rows, None, 1 / 4, "prinmix"), [300, 64])
    path = tmp_path / "v.delta"
    save_delta(delta, path)
    return delta, path


def test_vocab_rows_round_trip(tmp_path):
    delta, path = _with_vocab(tmp_path)
    back = load_delta(path)
    idx, m, shape = back.vocab["model.embed_tokens.weight"]
    assert torch.equal(idx, delta.vocab["model.embed_tokens.weight"][0]) and shape == [300, 64]
    assert torch.equal(m.reconstruct(), delta.vocab["model.embed_tokens.weight"][1].reconstruct())


@pytest.mark.parametrize("damage", ["row_count", "rows_past_end", "missing_blob"])
def test_malformed_vocab_rows_are_refused(tmp_path, damage):
    delta, _ = _with_vocab(tmp_path)
    idx, m, shape = delta.vocab["model.embed_tokens.weight"]
    if damage == "row_count":      # the blob is for 40 rows, the row set says 39
        delta.vocab["model.embed_tokens.weight"] = (idx[:-1], m, shape)
    elif damage == "rows_past_end":
        delta.vocab["model.embed_tokens.weight"] = (idx, m, [int(idx.max()), 64])
    path = tmp_path / "bad.delta"
    if damage == "rows_past_end":
        with pytest.raises(ValueError):   # the writer refuses it already
            save_delta(delta, path)
        return
    save_delta(delta, path)
    if damage == "missing_blob":
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
        tensors = load_file(str(path))
        tensors.pop("vocab/model.embed_tokens.weight/delta")
        m_json = json.loads(meta["prinmix"])
        m_json["checksums"].pop("vocab/model.embed_tokens.weight/delta")
        m_json.pop(METADATA_SHA256_FIELD)
        m_json[METADATA_SHA256_FIELD] = metadata_digest(m_json)      # a consistent file, one tensor short
        save_file(tensors, str(path), metadata={"prinmix": json.dumps(m_json)})
    with pytest.raises(DeltaFormatError, match="embed_tokens"):
        load_delta(path)
