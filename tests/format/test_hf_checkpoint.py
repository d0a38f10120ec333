"""The merged checkpoint's shards and index are what huggingface_hub.save_torch_state_dict writes."""

from __future__ import annotations

import json

import pytest
import torch
from huggingface_hub import save_torch_state_dict
from safetensors.torch import load_file
from transformers import AutoConfig

from prinmix import api
from prinmix.checkpoint.reader import CheckpointReader
from prinmix.errors import PrinmixError


def test_sharded_merge_matches_huggingface_hub_layout(tiny_pair, tmp_path):
    base, ft = tiny_pair("llama", "bf16")
    delta = tmp_path / "d.delta"
    api.compress(base, ft, delta, method="lowrank", device="cpu")
    single = api.merge(base, delta, tmp_path / "single")
    sharded = api.merge(base, delta, tmp_path / "sharded", max_shard_size="100KB")
    assert (single / "model.safetensors").is_file() and not (single / "model.safetensors.index.json").exists()
    state = load_file(single / "model.safetensors")
    reference = tmp_path / "reference"
    reference.mkdir()
    save_torch_state_dict(state, reference, max_shard_size="100KB")
    ours = json.loads((sharded / "model.safetensors.index.json").read_text())
    theirs = json.loads((reference / "model.safetensors.index.json").read_text())
    assert ours == theirs and len(set(ours["weight_map"].values())) > 2
    assert sorted(p.name for p in sharded.glob("*.safetensors")) == sorted(p.name for p in reference.glob("*.safetensors"))
    reread = CheckpointReader(sharded)  # and prinmix (like transformers) reads it back
    assert reread.tensor_names == sorted(state)
    assert all(torch.equal(reread.get(n, dtype=None), state[n]) for n in state)


def test_merge_dtype_casts_weights_and_config(tiny_pair, tmp_path):
    base, ft = tiny_pair("llama")  # float32
    delta = tmp_path / "d.delta"
    api.compress(base, ft, delta, method="lowrank", device="cpu")
    full = load_file(api.merge(base, delta, tmp_path / "f32") / "model.safetensors")
    half = api.merge(base, delta, tmp_path / "bf16", dtype="bfloat16")
    got = load_file(half / "model.safetensors")
    assert all(got[n].dtype == torch.bfloat16 and torch.equal(got[n], full[n].to(torch.bfloat16)) for n in full)
    assert AutoConfig.from_pretrained(half).dtype == torch.bfloat16
    with pytest.raises(PrinmixError, match="--dtype 'int8'"):
        api.merge(base, delta, tmp_path / "bad", dtype="int8")


def test_merge_to_float32_of_a_bf16_base_is_not_rounded_to_bf16(tiny_pair, tmp_path):
    """dtype float32: the merged linear is base + ΔŴ in float32 (no bfloat16 rounding in between), the
    reference an exporter or server that adds ΔŴ to the base at run time reproduces."""
    base, ft = tiny_pair("llama", "bf16")
    delta = tmp_path / "d.delta"
    api.compress(base, ft, delta, method="lowrank", device="cpu")
    name, m = next(iter(api.load_delta(delta).matrices.items()))
    exact = CheckpointReader(base).get(name, dtype=None).float() + m.reconstruct(torch.float32)
    wide = load_file(api.merge(base, delta, tmp_path / "f32", dtype="float32") / "model.safetensors")[name]
    rounded = load_file(api.merge(base, delta, tmp_path / "bf16") / "model.safetensors")[name]
    assert wide.dtype == torch.float32 and torch.equal(wide, exact)
    assert rounded.dtype == torch.bfloat16 and torch.equal(rounded, exact.to(torch.bfloat16))
    assert not torch.equal(rounded.float(), exact)
