"""The packed C++ kernel's entry points besides the fused product (runtime/packed_kernel.py): the row gather
(embedding lookups of compressed vocabulary rows), the column-mapped product (lm_head logits) and the dequantised
factors (prefill rows) equal a float64 reconstruction from the unpacked codes within float32's rounding bound and
touch nothing else; PerTenantEmbedding / PerTenantRows with the kernel equal their torch reference (the payload's
lookup / head) in float32 and bfloat16; DeltaLinear sends a tenant's many rows to the dequantised factors."""


import pytest
import torch

from fixtures.compressed_deltas import prinmix_layout, reconstruct64
from fixtures.packed_kernel import U32, requires_compiler
from prinmix.runtime import delta_linear
from prinmix.runtime.delta_linear import DeltaLinear, TenantBatch, TenantContext, TenantDelta
from prinmix.runtime.packed import PackedLinear
from prinmix.runtime.packed_kernel import (
    ISA_LEVELS,
    PackedTable,
    add_dense_deltas,
    add_packed_deltas,
    add_packed_rows,
    cpu_isa,
    dequantized_factors,
)
from prinmix.runtime.tenant_modules import PerTenantEmbedding, PerTenantRows
from prinmix.runtime.vocab_rows import VocabPayload

pytestmark = requires_compiler
WIDTHS = list(range(1, 9))


def _abs_delta64(m) -> torch.Tensor:
    """|σ Û| |V̂| [h_out, h_in] with codes and zero points summed before they cancel: the magnitude of the terms the
    gather adds for each entry."""
    out = torch.zeros(m.shape, dtype=torch.float64)
    for b in m.blocks:
        v = b.v.scale.double().abs() * (b.v.codes.double() + b.v.zero.double())
        u = b.u.scale.double().abs() * (b.u.codes.double() + b.u.zero.double()) * b.sigma.double().abs()[:, None]
        out += u.T @ v
    return out


def _require(isa: str) -> None:
    if ISA_LEVELS.index(isa) > ISA_LEVELS.index(cpu_isa()):
        pytest.skip(f"this CPU runs the packed kernel's paths up to '{cpu_isa()}', not '{isa}'")


@pytest.mark.parametrize("isa", ISA_LEVELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(37, 53), (1, 1), (300, 17), (130, 576)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_row_gather_equals_float64_reference(shape, dtype, isa):
    """y[rows[i]] += ΔŴ_slot[positions[i]] for two tenants (widths 1..8) in one call, repeated positions and the
    last row included; other rows of y stay bitwise; one rounding of y + Δ (float32 → dtype)."""
    h_rows, d = shape
    ms = {0: prinmix_layout(h_rows, d, widths=WIDTHS, seed=3), 2: prinmix_layout(h_rows, d, widths=WIDTHS[::-1], seed=4)}
    table = PackedTable.build({s: PackedLinear.from_compressed(m) for s, m in ms.items()})
    g = torch.Generator().manual_seed(h_rows + d)
    y0 = torch.randn(12, d, generator=g).to(dtype)
    positions = torch.tensor([h_rows - 1, 0, 0, h_rows // 2, h_rows - 1, h_rows // 3, 0])
    rows = torch.tensor([3, 0, 7, 11, 5, 1, 9])
    segments = [(0, 4, 0), (4, 3, 2)]
    y = y0.clone()
    _require(isa)
    add_packed_rows(positions, y, rows, segments, table, isa=isa)
    untouched = torch.ones(12, dtype=torch.bool)
    untouched[rows] = False
    assert torch.equal(y[untouched], y0[untouched])
    for first, count, slot in segments:
        p, r = positions[first:first + count], rows[first:first + count]
        delta = reconstruct64(ms[slot])[p]
        want = y0[r].double() + delta
        n = sum(b.rank for b in ms[slot].blocks) + 4
        unit = U32 if dtype == torch.float32 else 2.0 ** -8
        tol = 2 * n * U32 * _abs_delta64(ms[slot])[p] + unit * want.abs()
        assert ((y[r].double() - want).abs() <= tol).all(), slot


def test_column_mapped_product_equals_float64_reference():
    """cols: output o of ΔŴ [|R|, d] lands in logit column cols[o]; the other columns and rows stay bitwise."""
    vocab, d = 301, 70
    g = torch.Generator().manual_seed(1)
    cols = torch.sort(torch.randperm(vocab, generator=g)[:173]).values
    m = prinmix_layout(cols.numel(), d, widths=WIDTHS, seed=5)
    table = PackedTable.build({0: PackedLinear.from_compressed(m)})
    x = torch.randn(6, d, generator=g)
    y0 = torch.randn(6, vocab, generator=g)
    rows = torch.tensor([4, 1, 2])
    y = y0.clone()
    add_packed_deltas(x, y, rows, [(0, 3, 0)], table, cols=cols)
    want = y0.double()
    want[rows[:, None], cols[None, :]] += x[rows].double() @ reconstruct64(m).T
    bound = x[rows].double().abs() @ _abs_delta64(m).T
    tol = 2 * (d + sum(b.rank for b in m.blocks) + 4) * U32 * bound + U32 * want[rows][:, cols].abs()
    assert ((y[rows][:, cols].double() - want[rows][:, cols]).abs() <= tol).all()
    assert torch.equal(y[[0, 3, 5]], y0[[0, 3, 5]])
    others = torch.ones(vocab, dtype=torch.bool)
    others[cols] = False
    assert torch.equal(y[:, others], y0[:, others])
    with pytest.raises(RuntimeError, match="increasing"):
        add_packed_deltas(x, y, rows, [(0, 3, 0)], table, cols=cols.flip(0))


def _payloads(vocab, d):
    """Two tenants' vocabulary payloads: compressed rows (a subset of the vocabulary), one with exact added rows."""
    out = {}
    for slot, seed in ((0, 7), (3, 8)):
        g = torch.Generator().manual_seed(seed)
        index = torch.sort(torch.randperm(vocab - 4, generator=g)[: vocab // 2]).values
        m = prinmix_layout(index.numel(), d, widths=[2, 3, 4, 7, 2, 2], seed=seed)
        exact_index = torch.tensor([vocab - 3, vocab - 1]) if slot == 3 else torch.zeros(0, dtype=torch.int64)
        exact = torch.randn(exact_index.numel(), d, generator=g)
        out[slot] = VocabPayload(index, PackedLinear.from_compressed(m), exact_index, exact)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vocabulary_modules_with_the_kernel_equal_the_reference(dtype):
    """PerTenantEmbedding / PerTenantRows (tied: one payload per tenant) with kernel=True against the same modules
    with kernel=False (the payload's torch lookup / head): tokens inside and outside R, exact rows, a base row, a
    slot with no payload; float32 within 1e-5 relative, bfloat16 within one rounding (2⁻⁸ relative)."""
    vocab, d = 97, 40
    payloads = _payloads(vocab, d)
    torch.manual_seed(0)
    emb = torch.nn.Embedding(vocab, d).to(dtype)
    head = torch.nn.Linear(d, vocab, bias=True).to(dtype)
    out = {}
    for kernel in (False, True):
        ctx = TenantContext()
        e, h = PerTenantEmbedding(emb, ctx, kernel=kernel), PerTenantRows(head, ctx, kernel=kernel)
        for slot, p in payloads.items():
            e.load_tenant(slot, p)
            h.load_tenant(slot, p)
        ids = torch.tensor([[int(payloads[0].index[0]), vocab - 2, int(payloads[0].index[-1])],
                            [vocab - 1, int(payloads[3].index[5]), vocab - 3],
                            [1, 2, 3], [4, 5, 6]])
        ctx.batch = TenantBatch([0, 3, -1, 5])                    # 5: a slot with no payload
        hidden = torch.randn(4, 3, d, generator=torch.Generator().manual_seed(2)).to(dtype)
        with torch.no_grad():
            out[kernel] = (e(ids), h(hidden))
        assert payloads[0].kernel_table() is not None
    unit = 1e-5 if dtype == torch.float32 else 2.0 ** -8
    for ref, fast in zip(out[False], out[True]):
        assert torch.equal(ref[2:], fast[2:])                     # base and payload-less rows untouched
        assert ((fast[:2].float() - ref[:2].float()).abs() <= unit * ref[:2].float().abs() + 1e-6).all()
    assert not torch.equal(out[True][0][0], emb(ids[0]))          # the tenant's rows did change


@pytest.mark.parametrize("isa", ["avx512", "scalar"])
@pytest.mark.parametrize("shape", [(37, 53), (1, 1), (300, 17), (130, 576)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_dequantized_factors_equal_float64_reference(shape, isa):
    """(x aᵀ) b = x ΔŴᵀ: each factor entry is one float32 rounding of scale·σ·(code − zero), so bᵀa is the float64
    reconstruction within a few float32 roundings of its terms' magnitude."""
    h_out, h_in = shape
    m = prinmix_layout(h_out, h_in, widths=WIDTHS, seed=9)
    table = PackedTable.build({1: PackedLinear.from_compressed(m), 4: PackedLinear.from_compressed(
        prinmix_layout(h_out, h_in, widths=[3, 2], seed=10))})
    _require(isa)
    a, b = dequantized_factors(table, 1, h_in, isa=isa)
    assert a.shape == (sum(blk.rank for blk in m.blocks), h_in) and b.shape == (a.shape[0], h_out)
    n = sum(blk.rank for blk in m.blocks) + 4
    tol = 2 * n * U32 * _abs_delta64(m)
    assert ((b.double().T @ a.double() - reconstruct64(m)).abs() <= tol).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("isa", ["bf16", "avx512", "scalar"])
def test_dense_call_equals_float64_reference(isa, dtype):
    """add_dense_deltas (a prefill's tenants: factors dequantised once, two float32 GEMMs per tenant, tenants split
    over the threads): three tenants, segments of 12–40 rows in permuted row order, rows of no segment bitwise
    untouched; within the float32 summation bound (h_in + K + 4 roundings) plus y + Δ's one rounding."""
    _require(isa)
    h_out, h_in = 130, 70
    ms = {s: prinmix_layout(h_out, h_in, widths=WIDTHS[s:] + [2, 3], seed=20 + s) for s in range(3)}
    table = PackedTable.build({s: PackedLinear.from_compressed(m) for s, m in ms.items()})
    g = torch.Generator().manual_seed(3)
    sizes, slots = [12, 40, 13, 20], [2, 0, 1, 0]
    n_rows = sum(sizes) + 5
    x = torch.randn(n_rows, h_in, generator=g).to(dtype)
    y0 = torch.randn(n_rows, h_out, generator=g).to(dtype)
    rows = torch.randperm(n_rows, generator=g)[: sum(sizes)]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    y = y0.clone()
    add_dense_deltas(x, y, rows, torch.tensor(list(zip(starts, sizes, slots))), table, isa=isa)
    untouched = torch.ones(n_rows, dtype=torch.bool)
    untouched[rows] = False
    assert torch.equal(y[untouched], y0[untouched])
    unit = U32 if dtype == torch.float32 else 2.0 ** -8
    for start, size, slot in zip(starts, sizes, slots):
        idx = rows[start:start + size]
        want = y0[idx].double() + x[idx].double() @ reconstruct64(ms[slot]).T
        n = h_in + sum(b.rank for b in ms[slot].blocks) + 4
        tol = 2 * n * U32 * (x[idx].double().abs() @ _abs_delta64(ms[slot]).T) + unit * want.abs()
        assert ((y[idx].double() - want).abs() <= tol).all(), (slot, size)


def test_many_rows_of_a_tenant_go_through_dequantised_factors(monkeypatch):
    """DeltaLinear's packed path: a tenant with ≥ DENSE_MIN_ROWS rows goes to the dense call, one with fewer to the
    fused call, one with many rows and a bias delta to the dequantised factors in torch; all equal the reference."""
    torch.manual_seed(0)
    base = torch.nn.Linear(64, 96)
    ref, fast = DeltaLinear(base, backend="torch"), DeltaLinear(base, backend="packed")
    for slot, seed, bias in ((0, 1, None), (2, 2, None), (3, 3, torch.randn(96) * 0.1)):
        for layer in (ref, fast):
            layer.load_tenant(slot, TenantDelta(PackedLinear.from_compressed(prinmix_layout(96, 64, WIDTHS, seed)),
                                                bias=bias))
    dense, factors = [], []
    real_dense, real_factors = delta_linear.add_dense_deltas, delta_linear.dequantized_factors
    monkeypatch.setattr(delta_linear, "add_dense_deltas", lambda x, y, rows, seg, table: dense.extend(
        seg[:, 2].tolist()) or real_dense(x, y, rows, seg, table))
    monkeypatch.setattr(delta_linear, "dequantized_factors", lambda table, slot, h_in: factors.append(slot) or
                        real_factors(table, slot, h_in))
    many = delta_linear.DENSE_MIN_ROWS
    slots = torch.tensor([0] * many + [2] * (many - 1) + [3] * many + [-1])
    x = torch.randn(slots.numel(), 64)
    with torch.no_grad():
        assert torch.allclose(fast(x, slots), ref(x, slots), atol=1e-5, rtol=1e-5)
    assert dense == [0] and factors == [3]
