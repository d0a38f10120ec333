"""Tenant-aware wrappers of the modules a delta changes besides its compressed linears.

    PerTenantParams     a small module (a norm) re-run with the tenant's parameters on its rows
    PerTenantEmbedding  nn.Embedding whose changed rows a tenant replaces (payload.lookup)
    PerTenantRows       an output nn.Linear (lm_head) whose changed weight rows a tenant replaces (payload.head)
A vocabulary payload is a RowsPayload (exact rows) or a vocab_rows.VocabPayload (compressed row deltas
of a whole-delta file, plus exact added rows); both answer lookup(tokens, base_rows) and
head(h, base_logits, bias).
Each keeps its tenants' payloads by slot (load_tenant / unload_tenant / resident_bytes, the
interface TenantRegistry drives, as DeltaLinear does) and reads the running batch's slots from the
shared TenantContext.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from .delta_linear import TenantContext
from .factor_cache import FactorCache
from .vocab_rows import VocabPayload, sorted_positions

__all__ = ["PerTenantEmbedding", "PerTenantParams", "PerTenantRows", "RowsPayload", "TensorsPayload",
           "output_is_weight_times"]


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

    def lookup(self, tokens: torch.Tensor, base_rows: torch.Tensor) -> torch.Tensor:
        """The tenant's embedding rows of `tokens` [T], given the base's rows [T, d] of those tokens."""
        out = base_rows.clone()
        pos, hit = sorted_positions(self.index, tokens)
        out[hit] = self.values[pos[hit]].to(out.dtype)
        return out

    def head(self, h: torch.Tensor, base_logits: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The tenant's logits for hidden rows h [n, d], given the base's logits [n, V]."""
        logits = nn.functional.linear(h, self.values.to(h.dtype),
                                      None if bias is None else bias[self.index]).to(base_logits.dtype)
        if self.index.numel() == base_logits.shape[-1]:   # every row changed (sorted, unique): no scatter
            return logits
        out = base_logits.clone()
        out[:, self.index] = logits
        return out


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
    last dim kept) are run through the module with that tenant's parameters (functional_call).

    Fast path, for a module whose output is its 1-D `weight` times a weight-free part (Llama / Qwen2 /
    Mistral RMSNorm: weight · normed(x)), verified bitwise on random inputs once per input dtype: one
    call of a copy of the module with weight = 1 for all rows, then one product with each row's weight
    (rows of a table of the tenants' weights, rebuilt after a load / unload) — one call per step instead of
    one per tenant. The copy is called directly rather than through functional_call (~35 µs less a call,
    61 norms a SmolLM2 step), and each batch's row → table-row index is computed once for all the norms of
    one size (cached on the TenantBatch)."""

    def __init__(self, base: nn.Module, context: TenantContext):
        super().__init__(base, context)
        self._scales_output: dict[torch.dtype, bool] = {}
        self._table: torch.Tensor | None = None
        self._unit: tuple[nn.Module, ...] = ()        # (copy of base with weight 1,); a tuple: not a submodule
        self._weights_only = True                     # every payload holds exactly {"weight"}

    def load_tenant(self, slot: int, payload) -> None:
        super().load_tenant(slot, payload)
        self._changed()

    def unload_tenant(self, slot: int) -> None:
        super().unload_tenant(slot)
        self._changed()

    def _changed(self) -> None:
        self._table = None
        self._weights_only = all(set(p.tensors) == {"weight"} for p in self.tenants.values())

    def forward(self, x: torch.Tensor, *args, **kwargs):
        batch = self.context.batch
        if batch is not None and self.tenants and not args and not kwargs and self._weight_scales_output(x.dtype):
            return self._forward_scaled(x, batch)
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

    def _weight_scales_output(self, dtype: torch.dtype) -> bool:
        if not self._weights_only:
            return False
        if dtype not in self._scales_output:
            self._scales_output[dtype] = output_is_weight_times(self.base, dtype)
        return self._scales_output[dtype]

    def _forward_scaled(self, x: torch.Tensor, batch) -> torch.Tensor:
        weight = self.base.weight
        if self._table is None:                       # row 0: the base (and slots without a payload here)
            table = weight.detach().expand(max(self.tenants) + 2, -1).clone()
            for slot, p in self.tenants.items():
                table[slot + 1] = p.tensors["weight"].to(weight.dtype)
            self._table = table
        if not self._unit or self._unit[0].weight.dtype != weight.dtype or self._unit[0].weight.device != weight.device:
            unit = copy.deepcopy(self.base)
            with torch.no_grad():
                unit.weight.fill_(1)
            self._unit = (unit,)
        rows = x.reshape(-1, x.shape[-1])
        index = batch.table_rows(rows.shape[0], self._table.shape[0], x.device)
        return (self._table.index_select(0, index) * self._unit[0](rows)).view(*x.shape[:-1], -1)


def output_is_weight_times(module: nn.Module, dtype: torch.dtype) -> bool:
    """Whether module(x) == weight · module_with_weight_1(x) bitwise for inputs of `dtype` (probed with
    random inputs and two random weights): true of RMSNorm-style modules whose only parameter is a
    1-D weight applied last."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.ndim != 1 or [n for n, _ in module.named_parameters()] != ["weight"]:
        return False
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, weight.shape[0], generator=g).to(weight.device, dtype)
    with torch.no_grad():
        normed = torch.func.functional_call(module, {"weight": torch.ones_like(weight)}, (x,))
        for _ in range(2):
            w = (torch.randn(weight.shape, generator=g) + 1).to(weight)
            if not torch.equal(torch.func.functional_call(module, {"weight": w}, (x,)), w * normed):
                return False
    return True


class _VocabFactors:
    """The cached factors of tenants' compressed vocabulary rows (VocabPayload.packed), keyed by payload:
    a tied embedding and lm_head share one payload object, hence one cache entry. The owning modules
    forget a payload's entry when its slot is loaded or unloaded, before the payload can be freed (so
    a later payload cannot reuse its id while the entry lives)."""

    def __init__(self, cache: FactorCache | None):
        self.cache = cache

    @staticmethod
    def key(p) -> tuple:
        return ("vocab rows", id(p))

    def get(self, p: VocabPayload, batch_id: int):
        if self.cache is None or p.packed is None or p.packed.sign is not None or not p.packed.rank:
            return None
        return self.cache.get(self.key(p), p.packed, batch_id)

    def forget(self, p) -> None:
        if self.cache is not None and p is not None:
            self.cache.drop(self.key(p))


class _VocabModule(_TenantModule):
    """Common part of the vocabulary wrappers: tenants' compressed rows' factors from the shared cache,
    forgotten when a slot is loaded or unloaded; `kernel`: products from the packed codes by the C++ kernel
    (runtime/packed_kernel.py; MultiTenantModel sets it, and no factor cache, where DeltaLinear runs "packed")."""

    def __init__(self, base: nn.Module, context: TenantContext, factor_cache: FactorCache | None = None,
                 kernel: bool = False):
        super().__init__(base, context)
        self.vocab_factors = _VocabFactors(factor_cache)
        self.kernel = kernel

    def load_tenant(self, slot: int, payload) -> None:
        self.vocab_factors.forget(self.tenants.get(slot))
        super().load_tenant(slot, payload)

    def unload_tenant(self, slot: int) -> None:
        self.vocab_factors.forget(self.tenants.get(slot))
        super().unload_tenant(slot)


class PerTenantEmbedding(_VocabModule):
    """nn.Embedding whose rows some tenants replace (looked up per token of that tenant's sequences).
    Compressed rows come from the shared `factor_cache` when given (see _VocabFactors)."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.base(ids)
        batch = self.context.batch
        if batch is None or not self.tenants:
            return out
        groups = batch.rows(ids.numel(), ids.device)
        flat_ids, rows_out = ids.reshape(-1).contiguous(), out.view(-1, out.shape[-1])
        for slot, start, length in groups.segments:
            p = self.tenants.get(slot)
            if p is None:
                continue
            idx = groups.rows_of(start, length)
            if self.kernel and isinstance(p, VocabPayload) and p.kernel_table() is not None:
                p.lookup_into(flat_ids, rows_out, idx)
                continue
            tokens, base_rows = flat_ids.index_select(0, idx), rows_out.index_select(0, idx)
            if isinstance(p, VocabPayload):
                rows = p.lookup(tokens, base_rows, self.vocab_factors.get(p, batch.serial))
            else:
                rows = p.lookup(tokens, base_rows)
            rows_out.index_copy_(0, idx, rows.to(rows_out.dtype))
        return out


class PerTenantRows(_VocabModule):
    """An output nn.Linear (lm_head) whose weight rows some tenants replace: those logits are recomputed.

    A tenant's compressed rows (VocabPayload) add h ΔŴ_Rᵀ; with a `factor_cache` (the model's, shared
    with the DeltaLinears) that product runs from the cached factors of ΔŴ_R like any linear's, instead of
    dequantising its [|R|, r] expand factor at every step (the largest single factor of a whole delta;
    SmolLM2 at 1/16: 67 → 1 ms a tenant and step)."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out = self.base(h)
        batch = self.context.batch
        if batch is None or not self.tenants:
            return out
        groups = batch.rows(h.numel() // h.shape[-1], h.device)
        rows_h, rows_out = h.reshape(-1, h.shape[-1]).contiguous(), out.view(-1, out.shape[-1])
        for slot, start, length in groups.segments:
            p = self.tenants.get(slot)
            if p is None:
                continue
            idx = groups.rows_of(start, length)
            if self.kernel and isinstance(p, VocabPayload) and p.kernel_table() is not None:
                p.head_into(rows_h, rows_out, idx, self.base.bias)
                continue
            if isinstance(p, VocabPayload):
                o = p.head(rows_h.index_select(0, idx), rows_out.index_select(0, idx), self.base.bias,
                           self.vocab_factors.get(p, batch.serial))
            else:
                o = p.head(rows_h.index_select(0, idx), rows_out.index_select(0, idx), self.base.bias)
            rows_out.index_copy_(0, idx, o.to(rows_out.dtype))
        return out
