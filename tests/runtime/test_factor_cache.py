"""The fast CPU path (backend "cached"): dense and int8 factors equal the float64 reconstruction, the
cached products equal the torch reference for mixed tenants, all widths and odd shapes, and the cache
keeps its byte budget, its LRU order and never serves a replaced tenant's stale factors."""

import pytest
import torch

from fixtures.compressed_deltas import all_widths, method_deltas, prinmix_layout, reconstruct64, value64
from prinmix.runtime.delta_linear import DeltaLinear, TenantBatch, TenantContext, TenantDelta, single_threaded
from prinmix.runtime.factor_cache import (
    INT8_PAD,
    DenseFactors,
    FactorCache,
    Int4Factors,
    Int8Factors,
    _split_int4,
    dense_factors,
    int4_factors,
    int8_factors,
)
from prinmix.runtime.packed import PackedLinear
from prinmix.runtime.tenant_modules import PerTenantEmbedding, PerTenantRows
from prinmix.runtime.vocab_rows import VocabPayload

H_OUT, H_IN = 37, 53          # odd shapes: scale groups and packed words end mid-row


@pytest.fixture(scope="module")
def deltas():
    return {**method_deltas(H_OUT, H_IN, seed=3), "widths 2-8": all_widths(H_OUT, H_IN, seed=3),
            "prinmix widths 2-7": prinmix_layout(H_OUT, H_IN, seed=3),
            "prinmix widths 2-3": prinmix_layout(H_OUT, H_IN, widths=[2, 3] * 6, seed=4)}   # int4 is smaller


def test_dense_factors_equal_float64_reconstruction(deltas):
    for name, m in deltas.items():
        if m.sign is not None:
            continue
        p = PackedLinear.from_compressed(m)
        f = dense_factors(p)
        assert f.a.shape == (p.rank, H_IN) and f.b.shape == (p.rank, H_OUT)
        dense = torch.zeros(H_OUT, H_IN, dtype=torch.float64)
        for b in m.blocks:                          # independent: the stored (unpacked) codes, in float64
            v = value64(b.v, b.bits)
            u = value64(b.u, b.bits)
            u = u.T if b.u_transposed else u
            if b.sigma is not None:
                u = u * b.sigma.double()[None, :]
            dense += u @ v
        assert torch.allclose(f.b.double().T @ f.a.double(), dense, atol=1e-6), name
        x = torch.randn(4, H_IN)
        assert torch.allclose(f.apply(x).double(), x.double() @ dense.T, atol=1e-5), name


def _layers(deltas, cache, dtype=torch.float32):
    torch.manual_seed(0)
    base = torch.nn.Linear(H_IN, H_OUT).to(dtype)
    ref, fast = DeltaLinear(base, backend="torch"), DeltaLinear(base, backend="cached", factor_cache=cache)
    for slot, m in enumerate(deltas.values()):
        bias = torch.randn(H_OUT) * 0.01 if slot % 2 else None
        for layer in (ref, fast):
            layer.load_tenant(slot, TenantDelta(PackedLinear.from_compressed(m), bias=bias))
    return base, ref, fast


@pytest.mark.parametrize("budget", [1 << 30, 0, 6000], ids=["all cached", "no cache", "some cached"])
def test_cached_path_equals_reference(deltas, budget):
    cache = FactorCache(budget)
    base, ref, fast = _layers(deltas, cache)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _ in range(3):                                           # misses, then hits
            x = torch.randn(29, H_IN, generator=g)
            slots = torch.randint(-1, len(deltas), (29,), generator=g)
            y_ref, y_fast = ref(x, slots), fast(x, slots)
            assert torch.allclose(y_fast, y_ref, atol=1e-5, rtol=1e-5)
            assert torch.equal(y_fast[slots == -1], base(x)[slots == -1])
        xb = torch.randn(4, 3, H_IN, generator=g)
        assert torch.allclose(fast(xb, [5, -1, 0, 5]), ref(xb, [5, -1, 0, 5]), atol=1e-5, rtol=1e-5)
    assert cache.used_bytes <= budget
    if budget == 0:
        assert len(cache) == 0 and cache.hits == 0
    elif budget > 1 << 20:
        assert cache.hits > 0 and len(cache) == len(deltas) - 1      # every low-rank tenant (not BitDelta)


def test_bfloat16_model_and_cache(deltas):
    cache = FactorCache(1 << 30, dtype=torch.bfloat16)
    base, ref, fast = _layers(deltas, cache, torch.bfloat16)
    x = torch.randn(12, H_IN).bfloat16()
    slots = torch.tensor([0, 1, 2, 3, 4, 5, -1, 5, 4, 3, 2, 1])
    with torch.no_grad():
        y_ref, y_fast = ref(x, slots), fast(x, slots)
    assert y_fast.dtype == torch.bfloat16
    assert torch.allclose(y_fast.float(), y_ref.float(), atol=3e-2, rtol=2e-2)
    assert torch.equal(y_fast[6], base(x)[6])


def test_lru_budget_and_batch_protection(deltas):
    p = {n: PackedLinear.from_compressed(deltas[n]) for n in ("prinmix", "deltacome", "lowrank")}
    size = {n: dense_factors(q).nbytes() for n, q in p.items()}
    cache = FactorCache(size["prinmix"] + size["deltacome"] + 1)
    cache.get("a", p["prinmix"], 1)
    cache.get("b", p["deltacome"], 1)
    assert cache.used_bytes == size["prinmix"] + size["deltacome"]
    assert cache.get("c", p["lowrank"], 1) is None and "c" not in cache        # batch 1 holds a and b: no room
    cache.get("a", p["prinmix"], 2)                                            # a is now the most recent
    cache.get("c", p["lowrank"], 2)                                            # evicts b (LRU), not a
    assert "a" in cache and "b" not in cache and "c" in cache
    assert cache.used_bytes <= cache.budget_bytes
    assert (cache.hits, cache.misses) == (1, 4)


def test_reloaded_slot_never_serves_stale_factors(deltas):
    cache = FactorCache(1 << 30)
    torch.manual_seed(0)
    base = torch.nn.Linear(H_IN, H_OUT)
    layer = DeltaLinear(base, backend="cached", factor_cache=cache)
    ref = DeltaLinear(base, backend="torch")
    x = torch.randn(3, H_IN)
    with torch.no_grad():
        for name in ("prinmix", "lowrank"):                          # same slot, another tenant
            for lay in (layer, ref):
                lay.load_tenant(0, TenantDelta(PackedLinear.from_compressed(deltas[name])))
            assert torch.allclose(layer(x, [0, 0, 0]), ref(x, [0, 0, 0]), atol=1e-5)
        layer.unload_tenant(0)
        assert len(cache) == 0
        assert torch.equal(layer(x, TenantBatch([0, 0, 0])), base(x))


def test_auto_uses_the_cache_only_when_given(deltas, monkeypatch):
    monkeypatch.setattr("prinmix.runtime.delta_linear.kernel_available", lambda: False)   # else "auto" is "packed"
    base = torch.nn.Linear(H_IN, H_OUT)
    cache = FactorCache(1 << 30)
    with_cache, without = DeltaLinear(base, factor_cache=cache), DeltaLinear(base)
    for layer in (with_cache, without):
        layer.load_tenant(0, TenantDelta(PackedLinear.from_compressed(deltas["prinmix"])))
    x = torch.randn(2, H_IN)
    with torch.no_grad():
        assert torch.allclose(with_cache(x, [0, 0]), without(x, [0, 0]), atol=1e-5)
    assert len(cache) == 1


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("h_out,h_in", [(37, 53), (64, 32), (1, 17), (130, 16)])
def test_int8_factors_hold_the_codes_exactly(h_out, h_in):
    """a8 / b8 are the stored codes minus their zero points (exact), zero-padded to INT8_PAD; the product
    equals x·ΔŴᵀ of the float64 reconstruction up to bfloat16 rounding of x and of x·a8ᵀ."""
    m = prinmix_layout(h_out, h_in, seed=h_out)
    f = int8_factors(PackedLinear.from_compressed(m))
    assert isinstance(f, Int8Factors)
    r = sum(b.rank for b in m.blocks)
    assert all(n % INT8_PAD == 0 for n in (*f.a8.shape, *f.b8.shape))
    want_a = torch.cat([b.v.codes.short() - b.v.zero.short() for b in m.blocks])
    want_b = torch.cat([b.u.codes.short() - b.u.zero.short() for b in m.blocks]).T
    assert torch.equal(f.a8[:r, :h_in].short(), want_a) and torch.equal(f.b8[:h_out, :r].short(), want_b)
    assert not f.a8[r:].any() and not f.a8[:, h_in:].any() and not f.b8[h_out:].any() and not f.b8[:, r:].any()
    mid = torch.cat([b.v.scale.double()[:, 0] * b.u.scale.double()[:, 0] * b.sigma.double() for b in m.blocks])
    assert torch.allclose(f.mid[:r].double(), mid, rtol=2 ** -8)
    x = torch.randn(5, h_in, generator=torch.Generator().manual_seed(1))
    y = f.apply(x.bfloat16())
    assert y.shape == (5, h_out)
    assert _rel(y, x.double() @ reconstruct64(m).T) < 1e-2


def test_int8_factors_refuse_what_int8_cannot_hold(deltas):
    """Column-grouped scales, plain (non-transposed) Û, 16-bit factors, signs: None, and a FactorCache of
    dtype int8 keeps float32 DenseFactors for them; 8-bit codes only where C − z fits."""
    for name in ("mixed", "deltacome", "lowrank", "bitdelta", "widths 2-8"):
        p = PackedLinear.from_compressed(deltas[name])
        assert int8_factors(p) is None, name
        if p.sign is None:
            assert isinstance(FactorCache(1 << 30, torch.int8).get(name, p), DenseFactors), name
    wide = prinmix_layout(H_OUT, H_IN, widths=[8], seed=5)
    fits = bool(((wide.blocks[0].v.codes.short() - wide.blocks[0].v.zero.short()).abs().max() <= 127)
                and ((wide.blocks[0].u.codes.short() - wide.blocks[0].u.zero.short()).abs().max() <= 127))
    assert (int8_factors(PackedLinear.from_compressed(wide)) is not None) == fits
    narrow = prinmix_layout(H_OUT, H_IN, widths=[8], seed=5)
    for q in (narrow.blocks[0].v, narrow.blocks[0].u):
        q.codes.clamp_(100, 150)
        q.zero.fill_(128)
    assert isinstance(int8_factors(PackedLinear.from_compressed(narrow)), Int8Factors)


@pytest.mark.parametrize("dtype", [torch.int8, torch.int4])
@pytest.mark.parametrize("budget", [1 << 30, 0, 3000], ids=["all cached", "no cache", "some cached"])
def test_integer_cache_equals_reference(deltas, budget, dtype):
    """A model-wide int8 / int4 cache (PrinMix tenants as Int8Factors, or Int4Factors where smaller; the others
    as float32 factors) adds each row's delta within bfloat16 rounding of the delta, single- (decode-sized)
    and multi-threaded (prefill-sized); base rows untouched."""
    cache = FactorCache(budget, dtype)
    base, ref, fast = _layers(deltas, cache)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for n_rows in (31, 7, 200):
            x = torch.randn(n_rows, H_IN, generator=g)
            slots = torch.randint(-1, len(deltas), (n_rows,), generator=g)
            y0, y_ref, y_fast = base(x), ref(x, slots), fast(x, slots)
            assert torch.equal(y_fast[slots == -1], y0[slots == -1])
            for slot in slots.unique().tolist():
                rows = slots == slot
                if slot >= 0:
                    assert _rel(y_fast[rows] - y0[rows], y_ref[rows] - y0[rows]) < 1e-2, slot
    kinds = {type(f) for f, _ in cache._entries.values()}
    assert cache.used_bytes <= budget
    if budget > 1 << 20:
        assert kinds == ({Int8Factors, DenseFactors} if dtype == torch.int8 else {Int4Factors, Int8Factors, DenseFactors})


@pytest.mark.parametrize("dtype", [torch.int4, torch.int8, torch.float32])
def test_lm_head_rows_from_cached_factors(dtype):
    """PerTenantRows with a compressed-rows VocabPayload: the head product from the factor cache equals the
    packed reference (no cache) and the float64 reconstruction of the changed rows' logits."""
    g = torch.Generator().manual_seed(4)
    vocab, d = 70, 48
    index = torch.tensor(sorted(torch.randperm(vocab, generator=g)[:45].tolist()))
    m = prinmix_layout(index.numel(), d, widths=[2, 3] * 6 + [4], seed=9)
    payload = VocabPayload(index, PackedLinear.from_compressed(m), torch.zeros(0, dtype=torch.int64), torch.zeros(0, d))
    base = torch.nn.Linear(d, vocab, bias=False)
    cache = FactorCache(1 << 30, dtype)
    rows, layers = {}, {}
    for key, c in (("cached", cache), ("packed", None)):
        ctx = TenantContext()
        layers[key] = layer = PerTenantRows(base, ctx, c)
        layer.load_tenant(0, payload)
        ctx.batch = TenantBatch([0, -1, 0])
        with torch.no_grad():
            rows[key] = layer(torch.randn(3, 2, d, generator=torch.Generator().manual_seed(5)))
    h = torch.randn(3, 2, d, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        plain = base(h)
    want = plain.double()
    for i in (0, 2):
        want[i, :, index] += h[i].double() @ reconstruct64(m).T
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for key in rows:
        assert torch.equal(rows[key][1], plain[1])
        assert _rel(rows[key][[0, 2]] - plain[[0, 2]], want[[0, 2]] - plain[[0, 2]].double()) < tol, key
    assert len(cache) == 1 and cache.misses == 1
    kind = {torch.int4: Int4Factors, torch.int8: Int8Factors, torch.float32: DenseFactors}[dtype]
    assert isinstance(next(iter(cache._entries.values()))[0], kind)
    layers["cached"].load_tenant(0, payload)                          # a reload forgets the cached factors
    assert len(cache) == 0


@pytest.mark.parametrize("dtype", [torch.int4, torch.int8, torch.float32])
def test_embedding_rows_from_cached_factors(dtype):
    """PerTenantEmbedding with a compressed-rows VocabPayload: rows looked up through the cached factors equal
    the float64 reconstruction (base row + ΔŴ_R[position]); tokens outside R keep the base row; a tied lm_head
    sharing the payload shares its cache entry. Int4Factors have no row access: the lookup reads the packed codes."""
    g = torch.Generator().manual_seed(6)
    vocab, d = 70, 40
    index = torch.tensor(sorted(torch.randperm(vocab, generator=g)[:45].tolist()))
    m = prinmix_layout(index.numel(), d, widths=[2, 3] * 6, seed=12)
    payload = VocabPayload(index, PackedLinear.from_compressed(m), torch.zeros(0, dtype=torch.int64), torch.zeros(0, d))
    emb = torch.nn.Embedding(vocab, d)
    cache = FactorCache(1 << 30, dtype)
    ctx = TenantContext()
    layer, head = PerTenantEmbedding(emb, ctx, cache), PerTenantRows(torch.nn.Linear(d, vocab, bias=False), ctx, cache)
    layer.load_tenant(0, payload)
    head.load_tenant(0, payload)
    ids = torch.tensor([[int(index[0]), int(index[44]), 0], [int(index[3]), 1, 2]])
    outside = [i for i in range(vocab) if i not in set(index.tolist())][:2]
    ids[0, 2], ids[1, 1] = outside
    ctx.batch = TenantBatch([0, -1])
    with torch.no_grad():
        out = layer(ids)
        head(torch.randn(2, 3, d))
    rows = reconstruct64(m)
    want = emb.weight.detach().double()[ids[0]]
    want[:2] += rows[[0, 44]]
    assert _rel(out[0] - emb.weight[ids[0]], want - emb.weight.detach().double()[ids[0]]) < \
        (1e-5 if dtype in (torch.float32, torch.int4) else 1e-2)
    assert torch.equal(out[0, 2], emb.weight[ids[0, 2]]) and torch.equal(out[1], emb.weight[ids[1]])
    assert len(cache) == 1 and cache.hits == 1
    layer.unload_tenant(0)
    assert len(cache) == 0


def test_expected_nbytes_is_what_the_cache_stores(deltas):
    """FactorCache.expected_nbytes (from shapes, before building) equals the built factors' bytes."""
    for dtype in (torch.int8, torch.float32, torch.bfloat16):
        cache = FactorCache(1 << 30, dtype)
        for name, m in deltas.items():
            p = PackedLinear.from_compressed(m)
            if p.sign is None:
                assert cache.expected_nbytes(p) == cache.get(name, p).nbytes(), (name, dtype)


def test_int4_expected_nbytes_is_a_lower_bound(deltas):
    """For int4 the split of wide codes is data-dependent: expected_nbytes is a lower bound, exact for widths ≤ 3."""
    cache = FactorCache(1 << 30, torch.int4)
    for name, m in deltas.items():
        p = PackedLinear.from_compressed(m)
        if p.sign is None:
            expected, built = cache.expected_nbytes(p), cache.get(name, p)
            assert expected <= built.nbytes(), name
            if name == "prinmix widths 2-3":
                assert isinstance(built, Int4Factors) and expected == built.nbytes()


def test_split_int4_parts_sum_to_the_row():
    """Each row is the sum of its parts, every part in [−8, 7], with the fewest parts that allows."""
    g = torch.Generator().manual_seed(7)
    c = torch.cat([torch.randint(-127, 128, (20, 9), generator=g), torch.randint(-8, 8, (5, 9), generator=g),
                   torch.zeros(1, 9, dtype=torch.int64), torch.tensor([[15] * 9, [-16] * 9, [7, -8] + [0] * 7])])
    p, parts = _split_int4(c)
    assert parts.shape == (int(p.sum()), 9) and int(parts.min()) >= -8 and int(parts.max()) <= 7
    rows = torch.repeat_interleave(torch.arange(c.shape[0]), p)
    assert torch.equal(torch.zeros_like(c).index_add_(0, rows, parts.long()), c)
    fewest = torch.maximum(torch.ceil(-c.min(1).values / 8), torch.ceil(c.max(1).values / 7)).clamp(min=1)
    assert torch.equal(p, fewest.long())
    assert p[-3:].tolist() == [3, 2, 1] and p[20:26].tolist() == [1] * 6


@pytest.mark.parametrize("h_out,h_in", [(37, 53), (64, 32), (1, 17), (130, 16), (48, 300)])
def test_int4_factors_equal_float64_reconstruction(h_out, h_in):
    """Every width 2–7 in int4 (wide codes split into [−8, 7] parts; smaller_only=False builds them even where
    int8 is smaller), with and without an int8 remainder for the widest ranks: x·ΔŴᵀ of the float64
    reconstruction up to bfloat16 rounding of x and of the [n, entries] intermediate."""
    m = prinmix_layout(h_out, h_in, widths=list(range(2, 8)) * 2, seed=h_out)
    p = PackedLinear.from_compressed(m)
    x = torch.randn(6, h_in, generator=torch.Generator().manual_seed(2))
    want = x.double() @ reconstruct64(m).T
    split = int4_factors(p, rest_min_bytes=1 << 40, smaller_only=False)
    with_rest = int4_factors(p, rest_min_bytes=0, smaller_only=False)
    assert split.rest is None and split.entries > p.rank                       # 4–7-bit ranks took several entries
    assert with_rest.rest is not None and with_rest.entries < p.rank             # 5–7-bit ranks went to int8
    for f in (split, with_rest):
        y = f.apply(x.bfloat16())
        assert y.shape == (6, h_out) and y.dtype == torch.bfloat16
        assert _rel(y, want) < 1e-2
    low = prinmix_layout(h_out, h_in, widths=[2, 3] * 4, seed=h_out)            # one entry a rank
    f = int4_factors(PackedLinear.from_compressed(low), smaller_only=False)
    assert f.entries == sum(b.rank for b in low.blocks) and f.rest is None
    assert _rel(f.apply(x.bfloat16()), x.double() @ reconstruct64(low).T) < 1e-2


def test_int4_factors_only_where_smaller_and_exact(deltas):
    """int4_factors refuses what has no exact integer form (as int8) and, by default, what int8 holds in fewer
    bytes; a FactorCache of dtype int4 then keeps Int8Factors or float32 factors."""
    for name in ("mixed", "deltacome", "lowrank", "bitdelta", "widths 2-8"):
        p = PackedLinear.from_compressed(deltas[name])
        assert int4_factors(p, smaller_only=False) is None, name
    low, wide = (PackedLinear.from_compressed(deltas[n]) for n in ("prinmix widths 2-3", "prinmix widths 2-7"))
    assert isinstance(int4_factors(low), Int4Factors) and int4_factors(low).nbytes() < int8_factors(low).nbytes()
    assert int4_factors(wide) is None and isinstance(FactorCache(1 << 30, torch.int4).get("w", wide), Int8Factors)


def test_single_threaded_restores_the_thread_count():
    n = torch.get_num_threads()
    with single_threaded():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == n
    with single_threaded(False):
        assert torch.get_num_threads() == n
    with pytest.raises(ValueError), single_threaded():
        raise ValueError
    assert torch.get_num_threads() == n
