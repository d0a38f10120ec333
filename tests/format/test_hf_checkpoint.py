"""The merged checkpoint's shards and index are what huggingface_hub.save_torch_state_dict writes."""

from __future__ import annotations

import json

import torch
from huggingface_hub import save_torch_state_dict
from safetensors.torch import load_file

from prinmix import api
from prinmix.models.checkpoint import CheckpointReader


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
