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
