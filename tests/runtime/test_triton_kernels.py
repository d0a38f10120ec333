"""Triton shrink/expand/sign kernels equal the torch reference path (CPU: Triton's interpreter;
fp32 and fp16 only — the interpreter computes bf16 dots wrongly)."""

import os

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"          # must precede the first import of triton
triton = pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

from fixtures.compressed_deltas import H_IN, H_OUT, all_widths, method_deltas  # noqa: E402
from prinmix.runtime.delta_linear import DeltaLinear, TenantDelta  # noqa: E402
from prinmix.runtime.packed import PackedLinear  # noqa: E402

DEVICE = "cuda" if ON_GPU else "cpu"


@pytest.fixture(scope="module")
def deltas():
    return {**method_deltas(seed=1), "widths 2-8": all_widths(H_OUT, H_IN, seed=1)}


def _layers(deltas, dtype):
    torch.manual_seed(0)
    base = torch.nn.Linear(H_IN, H_OUT).to(DEVICE, dtype)
    ref, tri = DeltaLinear(base, backend="torch"), DeltaLinear(base, backend="triton")
    for slot, m in enumerate(deltas.values()):
        bias = torch.randn(H_OUT) * 0.01 if slot == 1 else None
        for layer in (ref, tri):
            layer.load_tenant(slot, TenantDelta(PackedLinear.from_compressed(m), bias=bias))
    return base, ref, tri


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.float16, 2e-2)])
def test_kernels_equal_torch_path(deltas, dtype, atol):
    base, ref, tri = _layers(deltas, dtype)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(41, H_IN, generator=g).to(DEVICE, dtype)
    slots = torch.randint(-1, len(deltas), (41,), generator=g)
    with torch.no_grad():
        y_ref, y_tri = ref(x, slots), tri(x, slots)
        assert torch.allclose(y_tri.float(), y_ref.float(), atol=atol, rtol=atol)
        base_rows = slots.to(DEVICE) == -1
        assert torch.equal(y_tri[base_rows], base(x)[base_rows])
        xb = torch.randn(3, 5, H_IN, generator=g).to(DEVICE, dtype)
        seq_slots = [4, 0, -1]
        assert torch.allclose(tri(xb, seq_slots).float(), ref(xb, seq_slots).float(), atol=atol, rtol=atol)


def test_stacked_buffers_are_the_only_copy(deltas):
    _, _, tri = _layers(deltas, torch.float32)
    stack = tri.stacked()
    payload = sum(tri.resident_bytes(s) for s in tri.tenants)
    assert stack.nbytes() == payload - H_OUT * 4 - 2     # bias deltas and BitDelta's f16 scale live elsewhere
    ptr0 = stack.codes.data_ptr()
    packed = tri.tenants[0].packed
    assert ptr0 <= packed.blocks[0].v.data.data_ptr() < ptr0 + stack.codes.numel()
    tri.unload_tenant(2)
    assert tri.stacked().nbytes() < payload                                     # rebuilt without slot 2
