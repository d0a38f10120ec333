"""The fused packed C++ kernel (runtime/packed_kernel.py): its products equal a float64 reconstruction from the
unpacked codes within float32's rounding bound, in each code path (ISA_LEVELS: scalar, AVX-512BW, VBMI, BF16 —
forced one by one; those this CPU lacks are skipped, naming them), for float32 / bfloat16 / float16 activations,
every width 1..8, odd shapes, 1..64 rows a tenant and mixed tenants in one call; code streams ending at an
inaccessible page are never read past; DeltaLinear's "packed" backend equals the torch reference
(float32 and bfloat16 activations, tenants it leaves to the reference in the same batch); the table follows
loads and unloads; without the kernel everything falls back with one log line."""

import ctypes
import functools
import logging
import mmap

import pytest
import torch

from fixtures.compressed_deltas import method_deltas, prinmix_layout, reconstruct64
from fixtures.packed_kernel import U32, requires_compiler
from prinmix.runtime import packed_kernel
from prinmix.runtime.delta_linear import DeltaLinear, TenantDelta
from prinmix.runtime.packed import PackedLinear
from prinmix.runtime.packed_kernel import (
    ISA_LEVELS,
    PackedTable,
    add_packed_deltas,
    cpu_isa,
    default_isa,
    load_kernel,
    packed_delta,
    supported,
)

pytestmark = requires_compiler

# odd: rows of codes end mid-byte, partial 16- and 64-code chunks; h_out > 2048: two expand tiles
SHAPES = [(37, 53), (1, 1), (130, 17), (64, 96), (200, 576), (33, 130), (2100, 37)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _require(isa: str) -> None:
    """Skip where this CPU cannot run the `isa` path (the kernel would lower it: nothing new would be tested)."""
    if ISA_LEVELS.index(isa) > ISA_LEVELS.index(cpu_isa()):
        pytest.skip(f"this CPU runs the packed kernel's paths up to '{cpu_isa()}', not '{isa}'")


def _abs_terms64(m) -> torch.Tensor:
    """|ΔŴ|ᵀ of the terms the kernel adds, [h_in, h_out] float64: per rank the shrink sums sv·σ·(C + z)·|x| and
    the expand su·(C + z)·|t| (codes and zero points are summed before they cancel), so M = |x| @ this."""
    out = torch.zeros(m.shape[1], m.shape[0], dtype=torch.float64)
    for b in m.blocks:
        v = b.v.scale.double() * (b.v.codes.double() + b.v.zero.double())
        u = b.u.scale.double() * (b.u.codes.double() + b.u.zero.double())
        out += (v.T * b.sigma.double().abs()) @ u
    return out


def _tolerance(m, x: torch.Tensor, abs_terms: torch.Tensor | None = None) -> torch.Tensor:
    """Float32 summation bound γ_n·M (Higham): n = h_in + rank + 4 roundings along any output's chain (shrink
    sum over h_in, zero-point subtraction, scale products, expand sum over the rank), ×2 for safety. One wrong
    code of a 2-bit rank changes an output by ~M / (h_in·4), far above this bound at these shapes."""
    h_out, h_in = m.shape
    n = h_in + sum(b.rank for b in m.blocks) + 4
    return 2 * n * U32 * (x.double().abs() @ (_abs_terms64(m) if abs_terms is None else abs_terms))


@functools.cache
def _mixed_tenants(shape):
    """3 tenants' deltas of `shape` (widths 1..8 in each, different per tenant), their table and per slot the
    float64 ΔŴᵀ and |ΔŴ|ᵀ terms (shared by the parametrised calls: the references are the slow part)."""
    h_out, h_in = shape
    ms = {s: prinmix_layout(h_out, h_in, widths=list(range(1, 9))[s::1] + [2, 3][: s % 2 + 1], seed=s) for s in range(3)}
    table = PackedTable.build({s: PackedLinear.from_compressed(m) for s, m in ms.items()})
    return ms, table, {s: reconstruct64(m).T for s, m in ms.items()}, {s: _abs_terms64(m) for s, m in ms.items()}


def _mixed_call(shape, isa, parallel, dtype, sizes=(1, 64, 7, 3, 2, 5), slots=(2, 0, 1, 0, 2, 1)):
    """One call over mixed tenants (widths 1..8 in each, different per tenant) and segments of 1..64 rows, checked
    against the float64 reconstruction; rows of y outside the segments stay bitwise untouched. x in `dtype`
    (its values are the reference's x), y float32 (so the check sees the kernel's own float32 result). With
    several segments per thread the kernel runs whole segments a thread, else the shrink's and the expand's
    tasks in turn: both are covered."""
    h_out, h_in = shape
    ms, table, w64, abs64 = _mixed_tenants(shape)
    g = torch.Generator().manual_seed(h_out * 1000 + h_in)
    n_rows = sum(sizes) + 4                          # 4 rows belong to no segment (the base's)
    x = torch.randn(n_rows, h_in, generator=g).to(dtype)
    y0 = torch.randn(n_rows, h_out, generator=g)
    rows = torch.randperm(n_rows, generator=g)[: sum(sizes)]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    y = y0.clone()
    add_packed_deltas(x, y, rows, list(zip(starts, sizes, slots)), table, isa=isa, parallel=parallel)
    untouched = torch.ones(n_rows, dtype=torch.bool)
    untouched[rows] = False
    assert torch.equal(y[untouched], y0[untouched])
    for start, size, slot in zip(starts, sizes, slots):
        idx = rows[start:start + size]
        want = y0[idx].double() + x[idx].double() @ w64[slot]
        tol = _tolerance(ms[slot], x[idx], abs64[slot]) + U32 * want.abs()       # + the final rounding of y + Δ
        assert ((y[idx].double() - want).abs() <= tol).all(), (slot, size)


@pytest.mark.parametrize("dtype", DTYPES, ids=[str(d).split(".")[-1] for d in DTYPES])
@pytest.mark.parametrize("isa", ISA_LEVELS)
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{o}x{i}" for o, i in SHAPES])
def test_kernel_equals_float64_reference(shape, isa, dtype):
    """Every code path forced in turn (the bf16 path is taken for bfloat16 x and codes of ≤ 7 bits; the VBMI
    float32 path for the others), over torch's intra-op threads."""
    _require(isa)
    _mixed_call(shape, isa, True, dtype)


@pytest.mark.parametrize("shape", [(200, 576), (2100, 37)], ids=["200x576", "2100x37"])
def test_kernel_one_thread(shape):
    """The calling thread only (parallel=False) gives the same bound with the CPU's best path."""
    _mixed_call(shape, cpu_isa(), False, torch.bfloat16)


@pytest.mark.parametrize("isa", ISA_LEVELS)
def test_kernel_one_large_segment(isa):
    """One tenant's 64 rows (fewer segments than threads: the shrink's tasks, then the expand's, over the
    threads) — enough codes to go parallel."""
    _require(isa)
    _mixed_call((2100, 37), isa, True, torch.bfloat16, sizes=(64,), slots=(1,))


def _guarded(t: torch.Tensor, keep: list) -> torch.Tensor:
    """A copy of the uint8 tensor t whose last byte is the last one before a page the process may not read
    (mprotect PROT_NONE): a read past t's end kills the process."""
    page = mmap.PAGESIZE
    pages = -(-t.numel() // page) + 1
    buf = mmap.mmap(-1, pages * page)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.mprotect(ctypes.c_void_p(addr + (pages - 1) * page), ctypes.c_size_t(page), 0) == 0
    keep.append(buf)
    end = (pages - 1) * page
    out = torch.frombuffer(buf, dtype=torch.uint8, count=end)[end - t.numel():]
    out.copy_(t)
    return out


@pytest.mark.parametrize("isa", ISA_LEVELS)
def test_no_read_past_the_code_streams(isa):
    """Every factor's code stream ends right before an unreadable page, each width 1..8 with rows ending at the
    stream's end (h_in, h_out multiples of 8 and odd ones): the kernel finishes (no fault) with the exact result."""
    _require(isa)
    keep = []
    for h_out, h_in in [(64, 128), (37, 53), (2100, 37)]:
        m = prinmix_layout(h_out, h_in, widths=range(1, 9), seed=h_in)
        p = PackedLinear.from_compressed(m)
        for b in p.blocks:
            b.v.data, b.u.data = _guarded(b.v.data, keep), _guarded(b.u.data, keep)
        table = PackedTable.build({0: p})
        w64, abs64 = reconstruct64(m).T, _abs_terms64(m)
        for dtype in DTYPES:
            x = torch.randn(5, h_in).to(dtype)
            want = x.double() @ w64
            assert ((packed_delta(x, table, isa=isa).double() - want).abs() <= _tolerance(m, x, abs64)).all()


def test_default_isa_follows_the_environment(monkeypatch, caplog):
    """PRINMIX_KERNEL_ISA caps the path calls use by default; an unknown name falls back to the best, logged."""
    try:
        for value, want in (("avx512", "avx512"), ("scalar", "scalar"), ("sse2", ISA_LEVELS[-1])):
            monkeypatch.setenv("PRINMIX_KERNEL_ISA", value)
            default_isa.cache_clear()
            with caplog.at_level(logging.WARNING, logger=packed_kernel.__name__):
                assert default_isa() == want
        assert "PRINMIX_KERNEL_ISA='sse2' is none of scalar, avx512, vbmi, bf16" in caplog.text
    finally:
        monkeypatch.undo()
        default_isa.cache_clear()


def test_one_slot_product_and_supported_layouts():
    """packed_delta (the lm_head rows' call) is x·ΔŴᵀ for bfloat16 input too; only PrinMix's layout is supported."""
    m = prinmix_layout(45, 70, widths=[2, 3, 4, 8], seed=1)
    table = PackedTable.build({0: PackedLinear.from_compressed(m)})
    x = torch.randn(9, 70)
    for xin in (x, x.bfloat16()):
        want = xin.double() @ reconstruct64(m).T
        assert ((packed_delta(xin, table).double() - want).abs() <= _tolerance(m, xin)).all()
    kinds = {name: supported(PackedLinear.from_compressed(d)) for name, d in method_deltas().items()}
    assert kinds == {"mixed": False, "prinmix": True, "deltacome": False, "lowrank": False, "bitdelta": False}


def _layers(dtype, tenants):
    torch.manual_seed(0)
    base = torch.nn.Linear(64, 96).to(dtype)
    ref, fast = DeltaLinear(base, backend="torch"), DeltaLinear(base, backend="packed")
    for slot, (m, bias) in tenants.items():
        for layer in (ref, fast):
            layer.load_tenant(slot, TenantDelta(PackedLinear.from_compressed(m), bias=bias))
    return base, ref, fast


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_delta_linear_packed_equals_reference(dtype):
    """One batch of kernel tenants (with and without a bias delta), tenants the kernel leaves to the reference
    (grouped scales, raw 16-bit factors, plain Û, BitDelta signs) and base rows. float32: the two paths differ
    only in float32 summation order, ~γ_64 times the largest term (|Δ| reaches ~100 here: ≤ 1e-6 max|y| absolute;
    one wrong 2-bit code moves an output by ~max|Δ| / 256). bfloat16: both round float32 y + Δ once, so
    they agree exactly or by one bfloat16 ulp (2⁻⁷ relative) where that rounding tips."""
    others = method_deltas(96, 64, seed=2)
    tenants = {0: (prinmix_layout(96, 64, widths=range(1, 9), seed=3), None),
               1: (prinmix_layout(96, 64, widths=[2, 3] * 5, seed=4), torch.randn(96) * 0.01),
               2: (others["mixed"], None), 3: (others["bitdelta"], None), 4: (others["deltacome"], torch.randn(96)),
               5: (prinmix_layout(96, 64, widths=[2, 4, 7], seed=5), None)}
    base, ref, fast = _layers(dtype, tenants)
    g = torch.Generator().manual_seed(1)
    slots = torch.tensor([0] * 64 + [5] + [1] * 3 + [-1] * 2 + [2] * 5 + [3] * 2 + [4] + [5] * 17)
    slots = slots[torch.randperm(slots.numel(), generator=g)]
    x = torch.randn(slots.numel(), 64, generator=g).to(dtype)
    with torch.no_grad():
        got, want = fast(x, slots), ref(x, slots)
        assert torch.equal(got[slots == -1], base(x)[slots == -1])
    assert got.dtype == dtype
    if dtype == torch.float32:
        assert torch.allclose(got, want, atol=1e-6 * want.abs().max().item(), rtol=1e-5)
    else:
        diff = (got.float() - want.float()).abs()
        assert (diff <= want.float().abs() * 2 ** -7 + 1e-30).all()
        assert (diff == 0).float().mean() > 0.9
    assert fast.packed_table().slots == {0, 1, 5}


def test_table_follows_load_and_unload():
    """A replaced tenant is multiplied with its new delta (the table is rebuilt; no stale addresses)."""
    a, b = prinmix_layout(96, 64, widths=[2, 3], seed=6), prinmix_layout(96, 64, widths=[5, 2], seed=7)
    base, ref, fast = _layers(torch.float32, {0: (a, None)})
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert torch.allclose(fast(x, [0, 0, -1]), ref(x, [0, 0, -1]), atol=1e-5)
        for layer in (ref, fast):
            layer.load_tenant(0, TenantDelta(PackedLinear.from_compressed(b)))
        assert torch.allclose(fast(x, [0, 0, -1]), ref(x, [0, 0, -1]), atol=1e-5)
        fast.unload_tenant(0)
        assert torch.equal(fast(x, [0, 0, -1]), base(x))


def test_falls_back_without_the_kernel(monkeypatch, caplog):
    """PRINMIX_PACKED_KERNEL=0 (as a failed build): one log line, "packed" gives the reference's result and
    "auto" picks the factor cache / torch path."""
    m = prinmix_layout(96, 64, widths=[2, 3], seed=8)
    monkeypatch.setenv("PRINMIX_PACKED_KERNEL", "0")
    load_kernel.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger=packed_kernel.__name__):
            assert load_kernel() is None and not packed_kernel.kernel_available()
        assert [r.getMessage() for r in caplog.records] == [
            "prinmix: packed C++ kernel disabled (PRINMIX_PACKED_KERNEL=0); CPU deltas use the factor cache / "
            "torch path"]
        base, ref, fast = _layers(torch.float32, {0: (m, None)})
        auto = DeltaLinear(base)
        auto.load_tenant(0, TenantDelta(PackedLinear.from_compressed(m)))
        x = torch.randn(2, 64)
        with torch.no_grad():
            assert torch.equal(fast(x, [0, -1]), ref(x, [0, -1]))
            assert auto._backend_for(x) == "torch" and torch.equal(auto(x, [0, -1]), ref(x, [0, -1]))
    finally:
        monkeypatch.undo()
        load_kernel.cache_clear()
