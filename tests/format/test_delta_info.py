"""describe_delta (the whole file, verified) and delta_sizes (its header only) agree with the DeltaFile's
own byte counts; to_dict() is the `prinmix info --json` shape."""

import json

from fixtures.synthetic import synthetic_delta
from prinmix.algorithms.budget import storage_ratio
from prinmix.algorithms.compress_matrix import compress_matrix
from prinmix.format.delta_file import DeltaFile, save_delta
from prinmix.format.delta_info import delta_sizes, describe_delta


def test_info_and_header_sizes_agree(tmp_path):
    delta = DeltaFile("lowrank", 0.125, {}, base_fingerprint={"model_type": "llama", "content_hash": "ab" * 32})
    for i, (h_out, h_in) in enumerate([(24, 40), (40, 24)]):
        delta.matrices[f"model.layers.{i}.mlp.up_proj.weight"] = compress_matrix(
            synthetic_delta(h_out, h_in, seed=i), None, 0.125, "lowrank")
    path = tmp_path / "d.delta"
    file_bytes = save_delta(delta, path)
    info = describe_delta(path)
    sizes = delta_sizes(path)
    params = sum(m.shape[0] * m.shape[1] for m in delta.matrices.values())
    assert info.linear_bytes == sizes.linear_bytes == delta.linear_bytes()
    assert info.dense_delta_params == sizes.dense_delta_params == params
    assert info.linear_header_bytes == sizes.linear_header_bytes == delta.linear_header_bytes()
    assert info.ratio_achieved == sizes.ratio_achieved == 8 * delta.linear_bytes() / (16 * params)
    assert info.file_bytes == file_bytes and info.method == sizes.method == "lowrank"
    for name, m in delta.matrices.items():
        row = info.matrices[name]
        assert row.bytes == m.nbytes() and row.ratio == storage_ratio(m.nbytes(), m.shape[0] * m.shape[1])
        assert sum(row.widths.values()) == row.rank
    as_json = json.loads(json.dumps(info.to_dict()))
    assert {"path", "method", "ratio_requested", "ratio_achieved", "ratio_on_disk", "linear_bytes", "other_bytes",
            "aux_bytes", "file_bytes", "matrices", "other_tensors", "base", "lora_adapter_bytes",
            "ratio_vs_adapter", "linear_header_bytes", "dense_delta_params"} <= set(as_json)
    assert as_json["matrices"][name]["shape"] == list(m.shape)


def test_storage_ratio():
    assert storage_ratio(1, 4) == 0.125 and storage_ratio(5, 0) == 0.0
