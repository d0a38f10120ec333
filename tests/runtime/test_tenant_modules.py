"""PerTenantRows: a tenant's replaced lm_head rows (some or all) give the logits of the replaced weight
on that tenant's rows and the base's elsewhere."""

import pytest
import torch

from prinmix.runtime.delta_linear import TenantBatch, TenantContext
from prinmix.runtime.tenant_modules import PerTenantRows, RowsPayload


@pytest.mark.parametrize("changed", [torch.tensor([1, 4, 5, 10]), torch.arange(12)], ids=["some rows", "all rows"])
def test_replaced_rows_equal_the_replaced_weight(changed):
    torch.manual_seed(0)
    base = torch.nn.Linear(8, 12, bias=True)
    values = torch.randn(changed.numel(), 8)
    context = TenantContext()
    layer = PerTenantRows(base, context)
    layer.load_tenant(0, RowsPayload(changed, values))
    weight = base.weight.detach().clone()
    weight[changed] = values
    h = torch.randn(3, 2, 8)
    context.batch = TenantBatch([0, -1, 0])
    with torch.no_grad():
        out = layer(h)
        assert torch.allclose(out[[0, 2]], torch.nn.functional.linear(h[[0, 2]], weight, base.bias), atol=1e-5)
        assert torch.equal(out[1], base(h)[1])


class _OnePlusNorm(torch.nn.Module):
    """Gemma-style RMSNorm, x̂·(1 + w): not weight times a weight-free part."""

    def __init__(self, d):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + self.weight)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["llama rmsnorm", "gemma rmsnorm", "layernorm with bias"])
def test_per_tenant_norm_equals_functional_call(kind, dtype):
    """Each row gets the norm with its tenant's parameters (the scaled fast path where it applies)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from prinmix.runtime.tenant_modules import PerTenantParams, TensorsPayload, output_is_weight_times

    d = 24
    base = {"llama rmsnorm": LlamaRMSNorm(d), "gemma rmsnorm": _OnePlusNorm(d),
            "layernorm with bias": torch.nn.LayerNorm(d)}[kind].to(dtype)
    assert output_is_weight_times(base, dtype) == (kind == "llama rmsnorm")
    g = torch.Generator().manual_seed(0)
    payloads = {s: {n: (torch.randn(p.shape, generator=g) * 0.1 + 1).to(dtype) for n, p in base.named_parameters()}
                for s in (0, 3)}
    context = TenantContext()
    layer = PerTenantParams(base, context)
    for s, t in payloads.items():
        layer.load_tenant(s, TensorsPayload(t))
    x = torch.randn(5, 2, d, generator=g).to(dtype)
    seq_slots = [3, -1, 0, 7, 3]                                   # 7: a tenant with no payload here
    context.batch = TenantBatch(seq_slots)
    with torch.no_grad():
        out = layer(x)
        for i, s in enumerate(seq_slots):
            params = payloads.get(s, dict(base.named_parameters()))
            ref = torch.func.functional_call(base, params, (x[i],))
            assert torch.equal(out[i], ref), (kind, s)
