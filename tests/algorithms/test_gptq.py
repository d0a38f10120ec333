import pytest
import torch

from prinmix.algorithms.gptq import GPTQLayout, gptq_quantize
from prinmix.algorithms.quantize import dequantize, dequantize_codes, group_bounds, quantize_rtn

ROWS, COLS = 24, 80


def gen(seed):
    return torch.Generator().manual_seed(seed)


def correlated_hessian(cols=COLS, n=400, n_big=4, seed=0, dead=()):
    """H = X Xᵀ, X [cols, n] with a few large-variance directions (like real activations)."""
    g = gen(seed)
    X = torch.randn(cols, n, generator=g) + 6.0 * torch.randn(cols, n_big, generator=g) @ torch.randn(n_big, n, generator=g)
    X[list(dead)] = 0.0
    return X @ X.T / n


# ---- independent float64 reference: textbook OBQ/GPTQ, one column at a time, explicit H⁻¹ ----

def ref_fp16_ceil(x):
    x = x.clamp(2.0 ** -24, 65504.0)
    h = x.half()
    up = (h.view(torch.int16) + 1).view(torch.float16)
    return torch.where(h.double() < x, up, h).double()


def ref_params(x, bits):
    """x float64 [rows, n], bits long [rows] -> (scale, zero) [rows]; range includes 0."""
    top = (2 ** bits - 1).double()
    lo, hi = x.min(1).values.clamp(max=0), x.max(1).values.clamp(min=0)
    scale = ref_fp16_ceil((hi - lo) / top.clamp(min=1))
    zero = torch.minimum(torch.round(-lo / scale), top)
    return torch.where(top > 0, scale, 0.0), torch.where(top > 0, zero, 0.0)


def ref_quant(x, scale, zero, bits):
    top = (2 ** bits - 1).double()
    codes = torch.minimum((torch.round(x / torch.where(scale > 0, scale, 1.0)) + zero).clamp(min=0), top)
    codes = torch.where(scale > 0, codes, 0.0)
    return codes, scale * (codes - zero)


def reference_gptq(w, H, bits, bits_axis="row", scale_axis="row", bounds=None, percdamp=0.01):
    W, H = w.double().clone(), H.double().clone()
    rows, cols = W.shape
    dead = H.diagonal() == 0
    H.diagonal()[dead] = 1.0
    W[:, dead] = 0.0
    H += percdamp * H.diagonal().mean() * torch.eye(cols, dtype=torch.float64)
    Hinv = torch.linalg.inv(H)                    # inverse over the not-yet-quantised columns
    bits = torch.as_tensor(bits).long()
    bounds = bounds or [(0, cols)]
    codes = torch.zeros(rows, cols, dtype=torch.long)
    scale = torch.zeros(rows, cols, dtype=torch.float64)
    zero = torch.zeros(rows, cols, dtype=torch.float64)
    for j in range(cols):
        bits_j = bits if bits_axis == "row" else bits[j].expand(rows)
        if scale_axis == "row":
            for gs, ge in bounds:
                if gs == j:
                    s, z = ref_params(W[:, gs:ge], bits_j)
        else:
            s, z = ref_params(W[:, j:j + 1].T, bits[j:j + 1])
            s, z = s.expand(rows), z.expand(rows)
        c, q = ref_quant(W[:, j], s, z, bits_j)
        codes[:, j], scale[:, j], zero[:, j] = c.long(), s, z
        d = Hinv[j, j]
        W[:, j:] -= torch.outer((W[:, j] - q) / d, Hinv[j, j:])     # OBQ weight update
        W[:, j] = q
        Hinv = Hinv - torch.outer(Hinv[:, j], Hinv[j, :]) / d        # remove column j from H⁻¹
    return codes, scale * (codes - zero), scale, zero


def assert_matches_reference(res, ref, max_code_mismatch=0.005, max_scale_mismatch=0.03):
    """Float32 GPTQ vs the float64 reference. Rounding ties decided differently in float32 and
    float64 may flip a code by one, or a group's float16 scale by one float16 step (2**-10
    relative); both must be rare. Everything else agrees to float32 precision."""
    ref_codes, ref_dequant, ref_scale, ref_zero = ref
    scale, zero = (t.expand(res.codes.shape).double() for t in res.element_params())
    same_code = res.codes.long() == ref_codes
    same_params = (scale == ref_scale) & (zero == ref_zero)
    assert 1.0 - same_code.double().mean().item() <= max_code_mismatch
    assert 1.0 - same_params.double().mean().item() <= max_scale_mismatch
    assert torch.all((scale - ref_scale).abs() <= 2.0 ** -10 * ref_scale)
    same = same_code & same_params
    torch.testing.assert_close(res.dequant.double()[same], ref_dequant[same], rtol=1e-5, atol=1e-7)
    # what is stored is what was used: exact, and the params are storable
    assert torch.equal(res.dequant, dequantize_codes(res.codes, *res.element_params()))
    assert torch.equal(res.scale.half().float(), res.scale)
    assert torch.equal(res.zero.to(torch.uint8).float(), res.zero)


def weighted_error(w, w_hat, H):
    d = (w - w_hat).double()
    return torch.trace(d @ H.double() @ d.T).item()


# ---- (a) equality with the reference ----

@pytest.mark.parametrize("blocksize", [128, 32, 7])
def test_row_mode_matches_reference(blocksize):
    w, H = torch.randn(ROWS, COLS, generator=gen(1)), correlated_hessian(seed=2)
    for bits in (2, 4):
        res = gptq_quantize(w, H, torch.full((ROWS,), bits), blocksize=blocksize)
        assert res.scale.shape == (ROWS, 1) and res.group_bounds == [(0, COLS)]
        assert_matches_reference(res, reference_gptq(w, H, torch.full((ROWS,), bits)))


@pytest.mark.parametrize("group_size", [16, 24, 33])
def test_row_mode_groups_match_reference(group_size):
    w, H = torch.randn(ROWS, COLS, generator=gen(3)), correlated_hessian(seed=4)
    bits = torch.randint(1, 9, (ROWS,), generator=gen(5))
    res = gptq_quantize(w, H, bits, group_size=group_size, blocksize=32)   # groups straddle blocks
    bounds = group_bounds(COLS, group_size)
    assert res.group_bounds == bounds and res.scale.shape == (ROWS, len(bounds))
    assert_matches_reference(res, reference_gptq(w, H, bits, bounds=bounds))


def test_mixed_row_widths_including_zero_match_reference():
    w, H = torch.randn(ROWS, COLS, generator=gen(6)), correlated_hessian(seed=7)
    bits = torch.tensor([0, 2, 3, 4, 5, 6, 7, 8] * 3)
    res = gptq_quantize(w, H, bits, blocksize=32)
    assert_matches_reference(res, reference_gptq(w, H, bits))
    dropped = bits == 0
    assert torch.all(res.dequant[dropped] == 0) and torch.all(res.codes[dropped] == 0)
    assert torch.all(res.scale[dropped] == 0) and torch.all(res.zero[dropped] == 0)
    for b in (2, 3, 4, 5, 6, 7, 8):
        assert int(res.codes[bits == b].max()) <= 2 ** b - 1


def test_column_mode_matches_reference():
    """PrinMix's U step: per-column widths (incl. dropped columns) and per-column scales."""
    w, H = torch.randn(ROWS * 3, 40, generator=gen(8)), correlated_hessian(cols=40, seed=9)
    bits = torch.tensor([8] * 6 + [5] * 10 + [3] * 10 + [2] * 8 + [0] * 6)
    res = gptq_quantize(w, H, bits, layout=GPTQLayout.COLUMNS, blocksize=16)
    assert res.scale.shape == res.zero.shape == (40,)
    codes, dq, scale, zero = reference_gptq(w, H, bits, bits_axis="col", scale_axis="col")
    assert_matches_reference(res, (codes, dq, scale, zero))
    assert torch.all(res.dequant[:, bits == 0] == 0)
    # dropped columns first: their error (w[:, j] - 0) is compensated in the later columns
    bits_first = bits.flip(0)
    res2 = gptq_quantize(w, H, bits_first, layout=GPTQLayout.COLUMNS, blocksize=16)
    assert_matches_reference(res2, reference_gptq(w, H, bits_first, bits_axis="col", scale_axis="col"))
    plain = gptq_quantize(w[:, 6:], H[6:, 6:], bits_first[6:], layout=GPTQLayout.COLUMNS)
    assert not torch.allclose(res2.dequant[:, 6:], plain.dequant)


def test_column_widths_with_row_scales_match_reference():
    """DeltaCoMe-style U: per-column widths, row scales over column groups of equal width."""
    w, H = torch.randn(ROWS, 40, generator=gen(10)), correlated_hessian(cols=40, seed=11)
    bits = torch.tensor([8] * 4 + [3] * 20 + [2] * 16)
    groups = [(0, 4), (4, 16), (16, 24), (24, 40)]
    res = gptq_quantize(w, H, bits, layout=GPTQLayout.COLUMN_BITS, groups=groups, blocksize=10)
    assert res.scale.shape == (ROWS, 4)
    assert_matches_reference(res, reference_gptq(w, H, bits, bits_axis="col", bounds=groups))
    with pytest.raises(ValueError, match="different widths"):
        gptq_quantize(w, H, bits, layout=GPTQLayout.COLUMN_BITS, groups=[(0, 5), (5, 40)])


# ---- (b) GPTQ beats round-to-nearest in the H-weighted error ----

@pytest.mark.parametrize("bits", [2, 3, 4])
def test_lower_weighted_error_than_rtn(bits):
    w, H = torch.randn(64, COLS, generator=gen(12)), correlated_hessian(seed=13)
    for group_size in (None, 16):
        res = gptq_quantize(w, H, bits, group_size=group_size)
        rtn = dequantize(quantize_rtn(w, bits, group_size=group_size))
        assert weighted_error(w, res.dequant, H) < 0.8 * weighted_error(w, rtn, H)
    res = gptq_quantize(w, H, bits, clip_search=True)
    assert torch.equal(res.dequant, dequantize_codes(res.codes, *res.element_params()))
    assert weighted_error(w, res.dequant, H) < 0.8 * weighted_error(w, dequantize(quantize_rtn(w, bits)), H)


# ---- (c) one call on stacked rows == one call per width ----

def test_stacked_rows_equal_separate_calls():
    V = torch.linalg.qr(torch.randn(COLS, 16, generator=gen(14))).Q.T.contiguous()   # orthonormal rows
    H = correlated_hessian(seed=15)
    widths = [2, 3, 5, 8]
    stacked = gptq_quantize(V.repeat(len(widths), 1), H, torch.tensor(widths).repeat_interleave(16),
                            group_size=32, blocksize=16)
    for k, b in enumerate(widths):
        alone = gptq_quantize(V, H, b, group_size=32, blocksize=16)
        rows = slice(16 * k, 16 * (k + 1))
        same = stacked.codes[rows] == alone.codes
        assert same.double().mean() >= 0.995
        torch.testing.assert_close(stacked.dequant[rows][same], alone.dequant[same], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(stacked.scale[rows], alone.scale, rtol=1e-3, atol=0)


# ---- (d) dead inputs ----

def test_dead_columns():
    dead = (0, 5, 31, 32, 79)
    H = correlated_hessian(seed=16, dead=dead)
    assert torch.all(H.diagonal()[list(dead)] == 0)
    H_before = H.clone()
    w = torch.randn(ROWS, COLS, generator=gen(17))
    bits = torch.tensor([2, 3, 4, 0] * 6)
    res = gptq_quantize(w, H, bits, group_size=16, blocksize=32)
    assert torch.equal(H, H_before)                               # H not modified
    assert torch.isfinite(res.dequant).all() and torch.isfinite(res.scale).all()
    assert torch.all(res.dequant[:, list(dead)] == 0)
    assert_matches_reference(res, reference_gptq(w, H, bits, bounds=group_bounds(COLS, 16)))
    col = gptq_quantize(w, H, torch.full((COLS,), 3), layout=GPTQLayout.COLUMNS)
    assert torch.isfinite(col.dequant).all() and torch.all(col.dequant[:, list(dead)] == 0)
    all_dead = gptq_quantize(w, torch.zeros(COLS, COLS), 4)
    assert torch.all(all_dead.dequant == 0) and torch.isfinite(all_dead.scale).all()


# ---- API edges ----

def test_api_checks_and_edge_shapes():
    w, H = torch.randn(4, 6, generator=gen(18)), torch.eye(6)
    with pytest.raises(ValueError):
        gptq_quantize(w, H, torch.tensor([2, 3]))                        # wrong bits length
    with pytest.raises(ValueError):
        gptq_quantize(w, H, torch.full((6,), 2), layout=GPTQLayout.COLUMNS, group_size=3)  # one scale per column
    with pytest.raises(ValueError):
        gptq_quantize(w, H, 2, layout="diagonal")                         # not a layout
    with pytest.raises(ValueError):
        gptq_quantize(w, H, 2, groups=[(0, 3), (4, 6)])                   # gap
    with pytest.raises(ValueError):
        gptq_quantize(w, torch.eye(5), 2)
    # identity H, no damping effects on the rounding: GPTQ reduces to round-to-nearest
    res = gptq_quantize(w, H, 3)
    assert torch.equal(res.codes, quantize_rtn(w, 3).codes)
    assert gptq_quantize(torch.zeros(0, 6), H, 2).codes.shape == (0, 6)
    assert torch.all(gptq_quantize(w, H, 0).dequant == 0)
    assert gptq_quantize(w.double(), H.double(), 2).dequant.dtype == torch.float32


def test_indefinite_hessian_gets_more_damping_or_a_clear_error():
    w = torch.randn(4, 6, generator=gen(19))
    H = torch.diag(torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, -0.5]))
    with pytest.warns(RuntimeWarning, match="damping raised"):
        res = gptq_quantize(w, H, 3)
    assert torch.isfinite(res.dequant).all()
    with pytest.raises(ValueError, match="not positive definite"), pytest.warns(RuntimeWarning):
        gptq_quantize(w, torch.full((6, 6), float("nan")), 3)
