import torch

from prinmix.algorithms.compressed_linear import CompressedLinear, QuantizedMatrix, RankBlock, SignDelta


def _qm(rows, cols, bits, group, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2 ** bits, (rows, cols), generator=g, dtype=torch.uint8)
    ng = -(-cols // group)
    scale = torch.rand(rows, ng, generator=g).half()
    zero = torch.randint(0, 2 ** bits, (rows, ng), generator=g, dtype=torch.uint8)
    return QuantizedMatrix(codes, scale, zero, bits, group)


def test_dequantize_matches_elementwise_formula():
    q = _qm(5, 11, 3, 4, 0)
    ref = torch.empty(5, 11)
    for r in range(5):
        for c in range(11):
            ref[r, c] = float(q.scale[r, c // 4]) * (int(q.codes[r, c]) - int(q.zero[r, c // 4]))
    assert torch.allclose(q.dequantize(), ref)


def test_blob_round_trip_mixed_blocks_and_exact_size():
    h_out, h_in = 9, 13
    blocks = [RankBlock(5, _qm(2, h_in, 5, h_in, 1), _qm(2, h_out, 5, h_out, 2), u_transposed=True),
              RankBlock(2, _qm(3, h_in, 2, 4, 3), _qm(h_out, 3, 2, 2, 4), sigma=torch.rand(3).half()),
              RankBlock(16, torch.randn(1, h_in).half(), torch.randn(h_out, 1).half())]
    cl = CompressedLinear((h_out, h_in), "x", blocks)
    blob = cl.to_blob()
    assert blob.numel() == cl.nbytes()
    back = CompressedLinear.from_blob(blob, (h_out, h_in), "x")
    assert torch.equal(back.reconstruct(), cl.reconstruct())
    # Independent reconstruction: Σ_b U_b diag(σ_b) V_b
    ref = torch.zeros(h_out, h_in)
    for b in blocks:
        u = b.u.dequantize() if isinstance(b.u, QuantizedMatrix) else b.u.float()
        u = u.T if b.u_transposed else u
        s = b.sigma.float() if b.sigma is not None else torch.ones(u.shape[1])
        v = b.v.dequantize() if isinstance(b.v, QuantizedMatrix) else b.v.float()
        ref += u @ torch.diag(s) @ v
    assert torch.allclose(cl.reconstruct(), ref, atol=1e-5)


def test_sign_blob_round_trip():
    W = torch.randn(7, 9)
    cl = CompressedLinear((7, 9), "bitdelta", sign=SignDelta(W >= 0, torch.tensor(0.25).half()))
    back = CompressedLinear.from_blob(cl.to_blob(), (7, 9), "bitdelta")
    assert torch.equal(back.reconstruct(), torch.where(W >= 0, 0.25, -0.25))
    assert cl.to_blob().numel() == cl.nbytes() == 3 + 8
