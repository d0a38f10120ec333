"""DeltaLinear (torch reference path) and TenantRegistry: mixed tenants in one batch equal each
tenant's merged dense linear; base rows untouched; load/unload; LRU swapping is exact."""

import pytest
import torch

from fixtures.compressed_deltas import H_IN, H_OUT, method_deltas, mixed_blocks
from prinmix.algorithms.compressed_linear import BLOB_HEADER_BYTES, BLOCK_HEADER_BYTES, SIGN_HEADER_BYTES
from prinmix.errors import PrinmixError
from prinmix.runtime.delta_linear import DeltaLinear, TenantBatch, TenantDelta, TenantRegistry
from prinmix.runtime.packed import PackedLinear


def _base_linear(seed=0, dtype=torch.float32, bias=True):
    torch.manual_seed(seed)
    return torch.nn.Linear(H_IN, H_OUT, bias=bias).to(dtype)


def _reference(base, deltas_by_slot, x, row_slots):
    """Row by row: x W'ᵀ + b with W' = W + ΔŴ of the row's tenant (the merged dense linear)."""
    out = []
    for row, slot in zip(x, row_slots.tolist()):
        w = base.weight.float()
        if slot >= 0 and slot in deltas_by_slot:
            w = w + deltas_by_slot[slot].reconstruct()
        y = row.float() @ w.T + (base.bias.float() if base.bias is not None else 0)
        out.append(y)
    return torch.stack(out)


@pytest.fixture(scope="module")
def deltas():
    return method_deltas()


def test_packed_bytes_are_the_blob_payload(deltas):
    for name, m in deltas.items():
        p = PackedLinear.from_compressed(m)
        headers = SIGN_HEADER_BYTES - 2 if m.sign is not None else BLOB_HEADER_BYTES + BLOCK_HEADER_BYTES * len(m.blocks)
        assert p.resident_bytes == m.nbytes() - headers, name
        assert torch.allclose(p.reconstruct(), m.reconstruct(), atol=1e-6), name


def test_mixed_tenants_one_batch_equal_merged_linears(deltas):
    base = _base_linear()
    layer = DeltaLinear(base, backend="torch")
    by_slot = {}
    for slot, m in enumerate(deltas.values()):
        layer.load_tenant(slot, TenantDelta(PackedLinear.from_compressed(m)))
        by_slot[slot] = m
    g = torch.Generator().manual_seed(3)
    x = torch.randn(37, H_IN, generator=g)
    slots = torch.randint(-1, len(deltas), (37,), generator=g)
    slots[:3] = -1
    with torch.no_grad():
        y = layer(x, slots)
        ref = _reference(base, by_slot, x, slots)
        assert torch.allclose(y, ref, atol=1e-5, rtol=1e-5)
        base_rows = slots == -1
        assert torch.equal(y[base_rows], base(x)[base_rows])        # base rows: bit for bit the base linear
        # [B, S, in] with one slot per sequence
        xb = torch.randn(5, 7, H_IN, generator=g)
        seq_slots = torch.tensor([2, -1, 0, 4, 2])
        yb = layer(xb, seq_slots)
        refb = _reference(base, by_slot, xb.reshape(-1, H_IN), seq_slots.repeat_interleave(7)).view(5, 7, H_OUT)
        assert torch.allclose(yb, refb, atol=1e-5, rtol=1e-5)


def test_half_precision_base(deltas):
    base = _base_linear(dtype=torch.bfloat16)
    layer = DeltaLinear(base, backend="torch")
    layer.load_tenant(0, TenantDelta(PackedLinear.from_compressed(deltas["prinmix"])))
    x = torch.randn(6, H_IN).bfloat16()
    slots = torch.tensor([0, -1, 0, 0, -1, 0])
    with torch.no_grad():
        y = layer(x, slots)
        ref = _reference(base, {0: deltas["prinmix"]}, x, slots)
    assert y.dtype == torch.bfloat16
    assert torch.allclose(y.float(), ref, atol=3e-2, rtol=2e-2)
    assert torch.equal(y[1], base(x)[1])


def test_bias_delta_and_shape_check(deltas):
    base = _base_linear()
    layer = DeltaLinear(base, backend="torch")
    db = torch.randn(H_OUT)
    layer.load_tenant(0, TenantDelta(bias=db))
    x = torch.randn(3, H_IN)
    with torch.no_grad():
        y = layer(x, [0, -1, 0])
        assert torch.allclose(y[0], base(x[0]) + db, atol=1e-6)
        assert torch.equal(y[1], base(x)[1])
    with pytest.raises(PrinmixError, match="does not fit"):
        layer.load_tenant(1, TenantDelta(PackedLinear.from_compressed(mixed_blocks(H_IN, H_OUT))))


def test_load_unload_at_run_time(deltas):
    base = _base_linear()
    layer = DeltaLinear(base, backend="torch")
    x = torch.randn(4, H_IN)
    slots = [0, 1, 0, 1]
    with torch.no_grad():
        layer.load_tenant(0, TenantDelta(PackedLinear.from_compressed(deltas["deltacome"])))
        layer.load_tenant(1, TenantDelta(PackedLinear.from_compressed(deltas["bitdelta"])))
        both = layer(x, slots)
        layer.unload_tenant(1)
        assert layer.resident_bytes(1) == 0
        one = layer(x, slots)
        assert torch.equal(one[[0, 2]], both[[0, 2]])
        assert torch.equal(one[[1, 3]], base(x)[[1, 3]])           # an unloaded slot adds nothing
        layer.load_tenant(1, TenantDelta(PackedLinear.from_compressed(deltas["bitdelta"])))
        assert torch.equal(layer(x, slots), both)


def test_registry_lru_eviction_and_swap_back_are_exact(deltas):
    base = _base_linear()
    layers = {"a": DeltaLinear(base, backend="torch"), "b": DeltaLinear(_base_linear(1), backend="torch")}
    names = ["mixed", "prinmix", "deltacome", "lowrank"]
    payloads = {n: {"a": TenantDelta(PackedLinear.from_compressed(deltas[n])),
                    "b": TenantDelta(PackedLinear.from_compressed(deltas["bitdelta"]))} for n in names}
    sizes = {n: sum(p.nbytes() for p in payloads[n].values()) for n in names}
    budget = sorted(sizes.values())[-1] + sorted(sizes.values())[-2]          # any two fit, never three
    reg = TenantRegistry(layers, "cpu", budget_bytes=budget)
    for n in names:
        reg.register(n, payloads[n])
    x = torch.randn(2, 3, H_IN)

    def run(pair):
        slots = reg.acquire(pair)
        batch = TenantBatch([slots[n] for n in pair])
        return layers["b"](layers["a"](x, batch)[..., :H_IN], batch)

    with torch.no_grad():
        first = {pair: run(pair) for pair in (("mixed", "prinmix"), ("deltacome", "lowrank"))}
        assert reg.evictions == 2 and set(reg.resident) == {"deltacome", "lowrank"}
        assert reg.resident_bytes("mixed") == 0 and reg.resident_bytes("lowrank") == sizes["lowrank"]
        again = run(("mixed", "prinmix"))                                     # swapped back in
        assert torch.equal(again, first[("mixed", "prinmix")])
        assert reg.used_bytes() <= budget
        reg.acquire(["lowrank"])                                              # LRU touch
        reg.acquire(["deltacome"])                                            # evicts the least recent
        assert "lowrank" in reg.resident and "deltacome" in reg.resident
    with pytest.raises(PrinmixError, match="device budget"):
        reg.acquire(["mixed", "prinmix", "deltacome"])
    with pytest.raises(PrinmixError, match="unknown tenant"):
        reg.acquire(["nope"])
    reg.unregister("lowrank")
    assert "lowrank" not in reg and all(s is not None for s in map(reg.slot_of, reg.resident))


def test_fast_unpack_equals_packing_module():
    from prinmix.algorithms.packing import pack_codes, unpack_codes
    from prinmix.runtime.packed import unpack_fast

    g = torch.Generator().manual_seed(0)
    for bits in range(1, 9):
        for n in (1, 7, 8, 9, 64, 1001):
            codes = torch.randint(0, 2 ** bits, (n,), generator=g, dtype=torch.uint8)
            packed = pack_codes(codes, bits)
            assert torch.equal(unpack_fast(packed, bits, n), unpack_codes(packed, bits, n))


@pytest.mark.parametrize("bits", [2, 3, 5, 8])
def test_fused_products_equal_dequantised_ones(bits):
    """PackedMatrix.matmul_t / matmul (scales and zero points folded around the code product) = the same
    products with the dequantised matrix, in float64 as the reference."""
    from prinmix.algorithms.compressed_linear import QuantizedMatrix
    from prinmix.runtime.packed import PackedMatrix

    g = torch.Generator().manual_seed(bits)
    rows, cols = 24, 40
    q = QuantizedMatrix(torch.randint(0, 2 ** bits, (rows, cols), generator=g, dtype=torch.uint8),
                        (torch.rand(rows, 1, generator=g) * 0.1 + 0.01).half(),
                        torch.randint(0, 2 ** bits, (rows, 1), generator=g, dtype=torch.uint8), bits, cols)
    m = PackedMatrix.from_stored(q, bits)
    assert m.fused_rows()
    value = (q.scale.double() * (q.codes.double() - q.zero.double()))
    assert torch.allclose(m.dequantize().double(), value, atol=1e-6)
    x = torch.randn(3, cols, generator=g)
    assert torch.allclose(m.matmul_t(x).double(), x.double() @ value.T, rtol=1e-4, atol=1e-4)
    t = torch.randn(3, rows, generator=g)
    assert torch.allclose(m.matmul(t).double(), t.double() @ value, rtol=1e-4, atol=1e-4)
    grouped = PackedMatrix.from_stored(QuantizedMatrix(q.codes, q.scale.repeat(1, 2), q.zero.repeat(1, 2), bits, 20),
                                       bits)
    assert not grouped.fused_rows()                 # group scales: the dequantising path is used
