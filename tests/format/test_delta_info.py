"""describe_delta (the whole file, verified, without torch) and delta_sizes (its header only) agree with the
DeltaFile that load_delta (torch) reads back, part by part; to_dict() is the `prinmix info --json` shape."""

import json

import pytest
import torch

from fixtures.compressed_deltas import method_deltas
from fixtures.synthetic import synthetic_delta
from prinmix.algorithms.budget import storage_ratio
from prinmix.algorithms.compress_matrix import compress_matrix
from prinmix.errors import DeltaFormatError
from prinmix.format.delta_file import DeltaFile, load_delta, save_delta
from prinmix.format.delta_info import delta_sizes, describe_delta


def _every_part(method: str) -> DeltaFile:
    """Linears (every blob kind), exact tensors in bf16 and fp32, exact rows, compressed vocabulary rows, a
    config file, and a LoRA source size."""
    delta = DeltaFile(method, 0.125, {"whole": True, "lora_adapter_bytes": 4096, "nsamples": 8, "seqlen": 64},
                      base_fingerprint={"model_type": "llama", "content_hash": "ab" * 32})
    for i, (h_out, h_in) in enumerate([(24, 40), (40, 24)]):
        delta.matrices[f"model.layers.{i}.mlp.up_proj.weight"] = compress_matrix(
            synthetic_delta(h_out, h_in, seed=i), None, 0.125, method)
    for kind, m in method_deltas(seed=3).items():
        delta.matrices[f"model.layers.2.{kind}.weight"] = m
    g = torch.Generator().manual_seed(0)
    delta.dense["model.norm.weight"] = torch.randn(40, generator=g).bfloat16()
    delta.dense["model.layers.0.self_attn.q_proj.bias"] = torch.randn(24, generator=g)
    delta.rows["lm_head.weight"] = (torch.tensor([3, 7, 99]), torch.randn(3, 40, generator=g).bfloat16(), [100, 40])
    idx = torch.tensor([0, 1, 5, 9, 10, 63])
    delta.vocab["model.embed_tokens.weight"] = (idx, compress_matrix(synthetic_delta(6, 40, seed=5), None, 0.25,
                                                                     "lowrank"), [64, 40])
    delta.aux_files["config.json"] = b'{"model_type": "llama"}'
    return delta


@pytest.mark.parametrize("method", ["prinmix", "bitdelta"])
def test_describe_delta_equals_the_loaded_delta(tmp_path, method):
    path = tmp_path / "d.delta"
    file_bytes = save_delta(_every_part(method), path)
    info, ref = describe_delta(path), load_delta(path)  # the reference: torch's reading of the same file
    weights, whole = ref.weight_bytes(), ref.whole_delta_params()
    assert info.weight_bytes == weights and info.whole_params == whole
    assert info.ratio_whole == weights["total"] / (2 * whole)
    assert (info.linear_bytes, info.linear_header_bytes, info.dense_delta_params) == \
        (ref.linear_bytes(), ref.linear_header_bytes(), ref.dense_delta_params())
    assert (info.other_bytes, info.aux_bytes, info.file_bytes) == (ref.dense_bytes(), ref.aux_bytes(), file_bytes)
    assert info.ratio_achieved == storage_ratio(ref.linear_bytes(), ref.dense_delta_params())
    assert info.ratio_vs_adapter == ref.linear_bytes() / 4096
    assert info.other_tensors == sorted(ref.dense) + sorted(ref.rows)
    assert info.base == ref.base_fingerprint and info.whole_mode and info.method == method
    assert list(info.matrices) == list(ref.matrices)
    for name, m in ref.matrices.items():
        row = info.matrices[name]
        widths = {}
        for w in m.rank_widths():
            widths[str(w)] = widths.get(str(w), 0) + 1
        assert (row.shape, row.bytes, row.rank, row.widths) == (list(m.shape), m.nbytes(), m.rank, widths)
        assert list(row.widths) == sorted(row.widths, key=int, reverse=True)
        assert row.ratio == storage_ratio(m.nbytes(), m.shape[0] * m.shape[1])
    (name, (idx, m, shape)), = ref.vocab.items()
    assert info.vocab == {name: {"shape": shape, "rows": idx.numel(), "rank": m.rank,
                                 "bytes": weights["vocab"][name]}}
    assert info.settings["nsamples"] == 8 and info.settings["seqlen"] == 64
    sizes = delta_sizes(path)
    assert (sizes.linear_bytes, sizes.linear_header_bytes, sizes.dense_delta_params) == \
        (info.linear_bytes, info.linear_header_bytes, info.dense_delta_params)
    as_json = json.loads(json.dumps(info.to_dict()))
    assert {"path", "method", "ratio_requested", "ratio_achieved", "ratio_on_disk", "linear_bytes", "other_bytes",
            "aux_bytes", "file_bytes", "matrices", "other_tensors", "base", "lora_adapter_bytes", "ratio_vs_adapter",
            "linear_header_bytes", "dense_delta_params", "settings", "weight_bytes", "vocab"} <= set(as_json)


def test_describe_delta_refuses_a_corrupted_file(tmp_path):
    path = tmp_path / "d.delta"
    save_delta(_every_part("prinmix"), path)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF                         # a byte of the last tensor's data
    bad = tmp_path / "bad.delta"
    bad.write_bytes(bytes(data))
    with pytest.raises(DeltaFormatError, match="checksum mismatch in tensor"):
        describe_delta(bad)
    bad.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(DeltaFormatError, match="bad.delta"):
        describe_delta(bad)


def test_storage_ratio():
    assert storage_ratio(1, 4) == 0.125 and storage_ratio(5, 0) == 0.0
