"""Dequantised factors of the hottest tenants, kept within a byte budget (the fast CPU path).

A packed low-rank delta ΔŴ = Σ_b Û_b diag(σ_b) V̂_b (runtime/packed.py) costs little to multiply —
x·V̂ᵀ is [n, r], then ·Ûᵀ, with r ≪ h — but unpacking its codes at every step is the expense: on
2 CPU threads the torch reference spends ~95 % of a decode step's delta time in unpacking (measured,
benchmarks/README.md). `DenseFactors` holds the whole delta of one linear as two dense matrices,
every width block concatenated and σ folded into the shrink factor:

    shrink  A = [σ_1 ⊙ V̂_1; σ_2 ⊙ V̂_2; …]   [r, h_in]      (row j of block b scaled by σ_b[j])
    expand  B = [Û_1, Û_2, …]ᵀ               [r, h_out]     (stored transposed: t·B is row-major)

so x·ΔŴᵀ = (x·Aᵀ)·B: two small GEMMs per (tenant, linear) whatever the widths. They cost
r·(h_in + h_out)·itemsize bytes against ~r·(h_in + h_out)·b̄/8 packed (b̄ the mean width): ~9× the
packed bytes for float32 at b̄ ≈ 3.6, so only the most recently used (tenant, linear) pairs stay,
up to `budget_bytes` (LRU). A pair that does not fit is dequantised for the step and dropped.

Entries used by the batch being run are never evicted for another entry of the same batch: when
the hot set exceeds the budget, the first pairs of each step keep hitting instead of LRU evicting
every entry just before its next use (the cyclic-access worst case of plain LRU).
BitDelta's sign deltas are not low-rank (their dense form is a full matrix) and are not cached.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Hashable

import torch

from .packed import PackedLinear

__all__ = ["DenseFactors", "FactorCache", "dense_factors"]


@dataclass
class DenseFactors:
    """One tenant's delta of one linear as x·ΔŴᵀ = (x·Aᵀ)·B: a [r, h_in], b [r, h_out], same dtype."""

    a: torch.Tensor
    b: torch.Tensor

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.a, self.b))

    def apply(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """x [n, h_in] (the factors' dtype) → x·ΔŴᵀ [n, h_out], written into `out` when given."""
        return torch.matmul(x @ self.a.T, self.b, out=out)


def dense_factors(p: PackedLinear, dtype: torch.dtype = torch.float32) -> DenseFactors:
    """The rank blocks of `p` dequantised and concatenated (float32 arithmetic, then cast to dtype).
    p must have rank blocks (not a BitDelta sign delta)."""
    if p.sign is not None:
        raise ValueError("a sign (BitDelta) delta has no low-rank factors")
    h_out, h_in = p.shape
    device = p.blocks[0].v.data.device if p.blocks else "cpu"
    a = [b.v_matrix() * (b.sigma.float()[:, None] if b.sigma is not None else 1.0) for b in p.blocks]
    u = [b.u_matrix().T for b in p.blocks]
    a = torch.cat(a) if a else torch.zeros(0, h_in, device=device)
    u = torch.cat(u) if u else torch.zeros(0, h_out, device=device)
    return DenseFactors(a.to(dtype).contiguous(), u.to(dtype).contiguous())


class FactorCache:
    """LRU of DenseFactors keyed by (layer key, tenant slot), at most `budget_bytes` in all.

    get(key, packed, batch_id) returns the factors (cached, or built for this call only), counting
    hits and misses; drop(key) forgets an entry (its tenant was unloaded or replaced). batch_id names
    the forward pass being run (TenantBatch.serial); its entries are not evicted during it.
    """

    def __init__(self, budget_bytes: int, dtype: torch.dtype = torch.float32):
        if budget_bytes < 0:
            raise ValueError(f"factor cache budget must be >= 0 bytes, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self.dtype = dtype
        self._entries: OrderedDict[Hashable, tuple[DenseFactors, int]] = OrderedDict()
        self.used_bytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def get(self, key: Hashable, packed: PackedLinear, batch_id: int = -1) -> DenseFactors:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries[key] = (entry[0], batch_id)
            self._entries.move_to_end(key)
            self.hits += 1
            return entry[0]
        self.misses += 1
        factors = dense_factors(packed, self.dtype)
        if self._make_room(factors.nbytes(), batch_id):
            self._entries[key] = (factors, batch_id)
            self.used_bytes += factors.nbytes()
        return factors

    def drop(self, key: Hashable) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.used_bytes -= entry[0].nbytes()

    def clear(self) -> None:
        self._entries.clear()
        self.used_bytes = 0

    def _make_room(self, size: int, batch_id: int) -> bool:
        """Evict least recently used entries not of this batch until `size` more bytes fit."""
        if size > self.budget_bytes:
            return False
        victims, free = [], self.budget_bytes - self.used_bytes
        for key, (factors, used_by) in self._entries.items():
            if free >= size:
                break
            if used_by != batch_id or batch_id < 0:
                victims.append(key)
                free += factors.nbytes()
        if free < size:
            return False
        for key in victims:
            self.drop(key)
        return True
