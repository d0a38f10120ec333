"""The fast CPU path (backend "cached"): dense factors equal the float64 reconstruction, the cached
products equal the torch reference for mixed tenants, all widths and odd shapes, and the cache keeps
its byte budget, its LRU order and never serves a replaced tenant's stale factors."""

import pytest
import torch

from fixtures.compressed_deltas import all_widths, method_deltas
from prinmix.runtime.delta_linear import DeltaLinear, TenantBatch, TenantDelta
from prinmix.runtime.factor_cache import FactorCache, dense_factors
from prinmix.runtime.packed import PackedLinear

H_OUT, H_IN = 37, 53          # odd shapes: scale groups and packed words end mid-row


@pytest.fixture(scope="module")
def deltas():
    return {**method_deltas(H_OUT, H_IN, seed=3), "widths 2-8": all_widths(H_OUT, H_IN, seed=3)}


def test_dense_factors_equal_float64_reconstruction(deltas):
    for name, m in deltas.items():
        if m.sign is not None:
            continue
        p = PackedLinear.from_compressed(m)
        f = dense_factors(p)
        assert f.a.shape == (p.rank, H_IN) and f.b.shape == (p.rank, H_OUT)
        dense = torch.zeros(H_OUT, H_IN, dtype=torch.float64)
        for b in m.blocks:                          # independent: the stored (unpacked) codes, in float64
            v = _value64(b.v, b.bits)
            u = _value64(b.u, b.bits)
            u = u.T if b.u_transposed else u
            if b.sigma is not None:
                u = u * b.sigma.double()[None, :]
            dense += u @ v
        assert torch.allclose(f.b.double().T @ f.a.double(), dense, atol=1e-6), name
        x = torch.randn(4, H_IN)
        assert torch.allclose(f.apply(x).double(), x.double() @ dense.T, atol=1e-5), name


def _value64(q, bits):
    if bits == 16:
        return q.double()
    idx = torch.arange(q.codes.shape[1]) // q.group_size
    return q.scale.double()[:, idx] * (q.codes.double() - q.zero.double()[:, idx])


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
    assert cache.get("c", p["lowrank"], 1) is not None and "c" not in cache    # batch 1 holds a and b
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


def test_auto_uses_the_cache_only_when_given(deltas):
    base = torch.nn.Linear(H_IN, H_OUT)
    cache = FactorCache(1 << 30)
    with_cache, without = DeltaLinear(base, factor_cache=cache), DeltaLinear(base)
    for layer in (with_cache, without):
        layer.load_tenant(0, TenantDelta(PackedLinear.from_compressed(deltas["prinmix"])))
    x = torch.randn(2, H_IN)
    with torch.no_grad():
        assert torch.allclose(with_cache(x, [0, 0]), without(x, [0, 0]), atol=1e-5)
    assert len(cache) == 1
