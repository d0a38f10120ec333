"""Resume parts: what write_layer_part stores, read_layer_part gives back bit for bit (blobs, shapes, Eq. 8
objectives, exact tensors); the blobs stay packed until used."""

import torch

from fixtures.synthetic import calibration_hessian, synthetic_delta
from prinmix.algorithms.compress_matrix import compress_matrix
from prinmix.format.resume_part import MappedCompressedLinear, read_layer_part, write_layer_part


def test_layer_part_round_trip(tmp_path):
    W = synthetic_delta(24, 40, seed=1)
    H, _ = calibration_hessian(40, seed=2)
    q = compress_matrix(W, H, 1 / 8, "prinmix")
    v = compress_matrix(W[:, :32].contiguous(), None, 1 / 8, "lowrank")
    matrices = {"layers.0.q.weight": q, "layers.0.v.weight": v}
    dense = {"layers.0.norm.weight": torch.randn(24, dtype=torch.bfloat16)}
    path = tmp_path / "layer_00000.safetensors"
    write_layer_part("prinmix", matrices, dense, path)
    assert not list(tmp_path.glob("*.tmp"))                        # the temporary file was renamed
    part = read_layer_part(path)
    assert part.method == "prinmix" and list(part.matrices) == list(matrices)
    for name, m in matrices.items():
        got = part.matrices[name]
        assert isinstance(got, MappedCompressedLinear) and got._unpacked is None   # still packed
        assert got.shape == tuple(m.shape) and got.nbytes() == m.nbytes()
        assert torch.equal(got.to_blob(), m.to_blob())
        assert torch.equal(got.decoded().reconstruct(), m.reconstruct())
        assert got._unpacked is None                               # decoded() keeps nothing
    assert part.matrices["layers.0.q.weight"].info["objective"] == q.info["objective"]
    assert "objective" not in part.matrices["layers.0.v.weight"].info   # low-rank has no Eq. 8 objective
    assert torch.equal(part.dense["layers.0.norm.weight"], dense["layers.0.norm.weight"])
    assert part.dense["layers.0.norm.weight"].dtype == torch.bfloat16
