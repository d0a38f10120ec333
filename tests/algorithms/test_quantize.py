import pytest
import torch

from prinmix.algorithms.quantize import (
    QuantizedValues,
    dequantize,
    dequantize_codes,
    fp16_ceil,
    group_bounds,
    minmax_params,
    quantize_rtn,
    quantize_to_codes,
)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def expand_groups(t, q: QuantizedValues):
    return t.repeat_interleave(q.group_size, dim=1)[:, : q.codes.shape[1]]


@pytest.mark.parametrize("bits", range(1, 9))
def test_codes_in_range_and_error_at_most_half_step(bits):
    w = rand(16, 50, seed=bits) * torch.logspace(-3, 2, 16).unsqueeze(1)
    w[3] = w[3].abs() + 1.0            # all positive: range still includes 0
    w[4] = -w[4].abs()                 # all negative
    q = quantize_rtn(w, bits)
    assert q.codes.dtype == torch.uint8 and int(q.codes.max()) <= 2 ** bits - 1
    assert q.scale.shape == q.zero.shape == (16, 1) and q.group_size == 50
    assert torch.all(q.zero >= 0) and torch.all(q.zero <= 2 ** bits - 1)
    assert torch.equal(q.zero, q.zero.round())
    err = (dequantize(q) - w).abs()
    assert torch.all(err <= q.scale / 2 * (1 + 1e-5) + 1e-12)
    assert q.zero[3].item() == 0 and q.zero[4].item() == 2 ** bits - 1


def test_scale_and_zero_are_exactly_storable():
    w = rand(32, 40, seed=1) * torch.logspace(-6, 3, 32).unsqueeze(1)
    q = quantize_rtn(w, torch.randint(1, 9, (32,), generator=torch.Generator().manual_seed(2)), group_size=16)
    scale16, zero8 = q.scale.half(), q.zero.to(torch.uint8)
    assert torch.equal(scale16.float(), q.scale) and torch.equal(zero8.float(), q.zero)
    stored = QuantizedValues(q.codes, scale16.float(), zero8.float(), q.bits, q.group_size)
    assert torch.equal(dequantize(stored), dequantize(q))
    # and the scale is the fp16 value just above the ideal (max - min) / (2**b - 1)
    assert torch.all(q.scale[:, 0] >= (w[:, :16].amax(1).clamp(min=0) - w[:, :16].amin(1).clamp(max=0))
                     / (2.0 ** q.bits - 1))


def test_fp16_ceil():
    x = torch.tensor([0.0, 1e-12, 1e-7, 3e-5, 0.1, 1.0, 1000.3, 1e6])
    y = fp16_ceil(x)
    assert torch.equal(y.half().float(), y)
    assert torch.all(y >= x.clamp(max=65504.0))
    assert y[0] == y[1] == 2.0 ** -24 and y[5] == 1.0 and y[7] == 65504.0
    below = y.half().view(torch.int16) - 1                   # previous fp16 value is < x
    prev = below.view(torch.float16).float()
    assert torch.all(prev[2:7] < x[2:7])


def test_constant_zero_tiny_rows():
    w = torch.zeros(5, 9)
    w[1] = 3.7                               # constant positive
    w[2] = -0.25                             # constant negative
    w[3] = 1e-7 * rand(9, seed=3)            # tiny (needs a subnormal fp16 scale)
    w[4] = 1e-5 * rand(9, seed=4)
    for bits in (1, 4, 8):
        q = quantize_rtn(w, bits)
        wq = dequantize(q)
        assert torch.isfinite(wq).all() and torch.isfinite(q.scale).all()
        assert torch.equal(wq[0], torch.zeros(9)) and torch.equal(q.codes[0], torch.zeros(9, dtype=torch.uint8))
        assert torch.all(q.scale > 0)
        assert torch.all((wq - w).abs() <= q.scale / 2 * (1 + 1e-5))
    q8 = quantize_rtn(w, 8)
    assert torch.allclose(dequantize(q8)[1:3], w[1:3], rtol=2e-3)
    assert (dequantize(q8)[4] - w[4]).abs().max() < 1e-7          # tiny rows keep sensible precision


def test_groups_including_ragged_last_group():
    w = rand(6, 23, seed=5)
    q = quantize_rtn(w, 3, group_size=8)
    assert q.scale.shape == (6, 3) and q.group_size == 8
    assert group_bounds(23, 8) == [(0, 8), (8, 16), (16, 23)]
    for g, (s, e) in enumerate(group_bounds(23, 8)):
        sg, zg = minmax_params(w[:, s:e], 3)
        assert torch.equal(sg, q.scale[:, g]) and torch.equal(zg, q.zero[:, g])
        assert torch.equal(q.codes[:, s:e], quantize_to_codes(w[:, s:e], sg[:, None], zg[:, None], 3))
    err = (dequantize(q) - w).abs()
    assert torch.all(err <= expand_groups(q.scale, q) / 2 * (1 + 1e-5))
    # one group of all columns; group_size larger than cols
    assert quantize_rtn(w, 3, group_size=100).scale.shape == (6, 1)
    assert torch.equal(quantize_rtn(w, 3, group_size=100).codes, quantize_rtn(w, 3).codes)


def test_per_row_bits_including_zero():
    w = rand(5, 30, seed=6)
    bits = torch.tensor([0, 1, 2, 8, 0])
    q = quantize_rtn(w, bits, group_size=7)
    wq = dequantize(q)
    for r in (0, 4):
        assert torch.all(q.codes[r] == 0) and torch.all(q.scale[r] == 0) and torch.all(q.zero[r] == 0)
        assert torch.equal(wq[r], torch.zeros(30))
    for r, b in [(1, 1), (2, 2), (3, 8)]:
        assert int(q.codes[r].max()) <= 2 ** b - 1
        assert torch.equal(q.codes[r], quantize_rtn(w[r:r + 1], b, group_size=7).codes[0])
    assert torch.equal(q.bits, bits)
    errs = [(wq[r] - w[r]).square().sum().item() for r in (1, 2, 3)]
    assert errs[0] > errs[1] > errs[2]


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_clip_search_never_worse(bits):
    w = rand(64, 40, seed=bits)
    w[::4, 0] *= 8.0                                  # outliers make clipping worthwhile
    H_diag = torch.rand(40, generator=torch.Generator().manual_seed(9)) + 0.1
    for weight in (None, H_diag):
        d = torch.ones(40) if weight is None else weight

        def err(s, z):
            wq = dequantize_codes(quantize_to_codes(w, s[:, None], z[:, None], bits), s[:, None], z[:, None])
            return ((wq - w).square() * d).sum(1)

        s0, z0 = minmax_params(w, bits)
        s1, z1 = minmax_params(w, bits, clip_search=True, H_diag=weight)
        e0, e1 = err(s0, z0), err(s1, z1)
        assert torch.all(e1 <= e0)
        assert e1.sum() < e0.sum()                   # and it helps somewhere
        assert torch.all(s1 <= s0) and torch.equal(s1.half().float(), s1)
    q = quantize_rtn(w, bits, clip_search=True)
    assert (dequantize(q) - w).square().sum() <= (dequantize(quantize_rtn(w, bits)) - w).square().sum()


def test_dequantize_codes_broadcast_and_dropped_scale():
    codes = torch.tensor([[0, 3], [1, 2]], dtype=torch.uint8)
    out = dequantize_codes(codes, torch.tensor([[0.5], [0.0]]), torch.tensor([[1.0], [0.0]]))
    assert out.dtype == torch.float32 and out.tolist() == [[-0.5, 1.0], [0.0, 0.0]]
    c = quantize_to_codes(torch.tensor([[1.0, -2.0]]), torch.tensor([[0.0]]), torch.tensor([[0.0]]), 0)
    assert c.tolist() == [[0, 0]]


def test_bad_bits():
    with pytest.raises(ValueError):
        minmax_params(torch.zeros(2, 3), 9)
    with pytest.raises(ValueError):
        quantize_rtn(torch.zeros(2, 3), torch.tensor([1, -1]))
