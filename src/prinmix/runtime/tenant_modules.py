"""Tenant-aware wrappers of the modules a delta changes besides its compressed linears.

    PerTenantParams     a small module (a norm) re-run with the tenant's parameters on its rows
    PerTenantEmbedding  nn.Embedding whose changed rows a tenant replaces
    PerTenantRows       an output nn.Linear (lm_head) whose changed weight rows a tenant replaces
Each keeps its tenants' payloads by slot (load_tenant / unload_tenant / resident_bytes, the
interface TenantRegistry drives, as DeltaLinear does) and reads the running batch's slots from the
shared TenantContext.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .delta_linear import TenantContext

__all__ = ["PerTenantEmbedding", "PerTenantParams", "PerTenantRows", "RowsPayload", "TensorsPayload"]


@dataclass
class TensorsPayload:
    """A tenant's replacement parameters of one module: {parameter name: tensor}."""

    tensors: dict[str, torch.Tensor]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def to(self, device) -> "TensorsPayload":
        return TensorsPayload({k: v.to(device) for k, v in self.tensors.items()})


@dataclass
class RowsPayload:
    """A tenant's changed rows of an embedding / output matrix: sorted row ids int64 [n], values [n, d]."""

    index: torch.Tensor
    values: torch.Tensor

    def nbytes(self) -> int:
        return self.index.numel() * 8 + self.values.numel() * self.values.element_size()

    def to(self, device) -> "RowsPayload":
        return RowsPayload(self.index.to(device), self.values.to(device))


class _TenantModule(nn.Module):
    """Common part: the wrapped module, the shared context and the resident payloads by slot."""

    def __init__(self, base: nn.Module, context: TenantContext):
        super().__init__()
        self.base = base
        self.context = context
        self.tenants: dict[int, object] = {}

    def load_tenant(self, slot: int, payload) -> None:
        self.tenants[slot] = payload

    def unload_tenant(self, slot: int) -> None:
        self.tenants.pop(slot, None)

    def resident_bytes(self, slot: int) -> int:
        p = self.tenants.get(slot)
        return 0 if p is None else p.nbytes()

    def _segments(self, n_rows: int, device):
        batch = self.context.batch
        if batch is None or not self.tenants:
            return []
        groups = batch.rows(n_rows, device)
        return [(self.tenants[s], groups.rows_of(a, n)) for s, a, n in groups.segments if s in self.tenants]


class PerTenantParams(_TenantModule):
    """A small module (a norm) with per-tenant parameters: each tenant's rows (leading dims flattened,
    last dim kept) are run through the module with that tenant's parameters (functional_call)."""

    def forward(self, x: torch.Tensor, *args, **kwargs):
        out = self.base(x, *args, **kwargs)
        segments = self._segments(x.numel() // x.shape[-1], x.device)
        if not segments:
            return out
        out = out.contiguous()
        rows_x, rows_out = x.reshape(-1, x.shape[-1]), out.view(-1, out.shape[-1])
        for payload, idx in segments:
            o = torch.func.functional_call(self.base, payload.tensors, (rows_x.index_select(0, idx),) + args,
                                           kwargs, strict=False)
            rows_out.index_copy_(0, idx, o.to(rows_out.dtype))
        return out


class PerTenantEmbedding(_TenantModule):
    """nn.Embedding whose rows some tenants replace (looked up per token of that tenant's sequences)."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.base(ids)
        segments = self._segments(ids.numel(), ids.device)
        if not segments:
            return out
        flat_ids, rows_out = ids.reshape(-1), out.view(-1, out.shape[-1])
        for p, idx in segments:
            tok = flat_ids.index_select(0, idx)
            pos = torch.searchsorted(p.index, tok).clamp(max=p.index.numel() - 1)
            hit = p.index[pos] == tok
            rows_out.index_copy_(0, idx[hit], p.values[pos[hit]].to(rows_out.dtype))
        return out


class PerTenantRows(_TenantModule):
    """An output nn.Linear (lm_head) whose weight rows some tenants replace: those logits are recomputed."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out = self.base(h)
        segments = self._segments(h.numel() // h.shape[-1], h.device)
        if not segments:
            return out
        rows_h, rows_out = h.reshape(-1, h.shape[-1]), out.view(-1, out.shape[-1])
        bias = self.base.bias
        for p, idx in segments:
            logits = nn.functional.linear(rows_h.index_select(0, idx), p.values.to(h.dtype),
                                          None if bias is None else bias[p.index]).to(out.dtype)
            if p.index.numel() == out.shape[-1]:          # every row changed (sorted, unique): no scatter
                rows_out.index_copy_(0, idx, logits)
                continue
            o = rows_out.index_select(0, idx)
            o[:, p.index] = logits
            rows_out.index_copy_(0, idx, o)
        return out
