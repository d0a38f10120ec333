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
up to `budget_bytes` (LRU). A pair that does not fit gets no factors (`get` returns None): the caller
multiplies from the packed codes for that step (the torch reference's product), which costs less than
building factors only to drop them.

Entries used by the batch being run are never evicted for another entry of the same batch: when
the hot set exceeds the budget, the first pairs of each step keep hitting instead of LRU evicting
every entry just before its next use (the cyclic-access worst case of plain LRU).
BitDelta's sign deltas are not low-rank (their dense form is a full matrix) and are not cached.

`Int8Factors` (cache dtype torch.int8, MultiTenantModel's CPU default for 16-bit models) keeps the same two
products at 1 byte an entry instead of 4. PrinMix / Delta-CoMe store V̂ and the transposed Û with
one asymmetric (scale, zero) per row, so with codes C and integer zero points z:

    V̂_b[j, c] = sv_j (Cv_jc − zv_j)      Û_b[o, j] = su_j (Cu_jo − zu_j)
    x·ΔŴᵀ = [(x·A8ᵀ) ⊙ m]·B8ᵀ     A8 = Cv − zv  int8 [r, h_in],  m = sv ⊙ σ ⊙ su  [r],
                                  B8 = (Cu − zu)ᵀ int8 [h_out, r]

C − z is exact in int8 for widths ≤ 7 (|C − z| ≤ 127). Both products are torch's weight-only int8
GEMM (`torch._weight_int8pack_mm`, the kernel gpt-fast-style int8 weights use; activations bfloat16,
float32 accumulation, per-output-channel scale: m for the shrink, 1 for the expand). On 2 CPU threads
it is faster than float32 GEMMs of the same shapes at a quarter of the bytes (benchmarks/README.md);
the price is bfloat16 rounding of x and of the [n, r] intermediate (relative error ~2⁻⁸ of the delta
product, not of y). Every int8 matrix is zero-padded to multiples of INT8_PAD rows and columns: torch
2.13's CPU kernel returns garbage or crashes for other shapes (seen: [1537, 180], [1, 17], a segfault at
[49151, 200]; multiples of 16 in both checked up to [49152, 688]). A delta with a block it cannot hold exactly (8-bit codes whose C − z leaves int8,
column-grouped scales, raw 16-bit factors, Û not stored transposed) falls back to float32 DenseFactors.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Hashable

import torch

from .packed import PackedLinear

__all__ = ["DenseFactors", "FactorCache", "Int8Factors", "dense_factors", "int8_factors"]


@dataclass
class DenseFactors:
    """One tenant's delta of one linear as x·ΔŴᵀ = (x·Aᵀ)·B: a [r, h_in], b [r, h_out], same dtype."""

    a: torch.Tensor
    b: torch.Tensor

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.a, self.b))

    @property
    def input_dtype(self) -> torch.dtype:
        return self.a.dtype

    def apply(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """x [n, h_in] (input_dtype) → x·ΔŴᵀ [n, h_out], written into `out` when given."""
        return torch.matmul(x @ self.a.T, self.b, out=out)

    def rows(self, positions: torch.Tensor) -> torch.Tensor:
        """Rows ΔŴ[positions] [T, h_in] float32 (an embedding lookup of compressed rows)."""
        return self.b.index_select(1, positions).T.float() @ self.a.float()


INT8_PAD = 16


def _pad_to(n: int) -> int:
    return -(-n // INT8_PAD) * INT8_PAD


@dataclass
class Int8Factors:
    """One tenant's delta of one linear [h_out, h_in] as x·ΔŴᵀ = [(x·a8ᵀ) ⊙ mid]·b8ᵀ (module docstring),
    zero-padded to multiples of INT8_PAD (r' ≥ r, h_in' ≥ h_in, h_out' ≥ h_out): a8 int8 [r', h_in'],
    mid bfloat16 [r'], b8 int8 [h_out', r'], ones bfloat16 [h_out'] (the expand's scale)."""

    shape: tuple[int, int]
    a8: torch.Tensor
    mid: torch.Tensor
    b8: torch.Tensor
    ones: torch.Tensor

    input_dtype = torch.bfloat16

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.a8, self.mid, self.b8, self.ones))

    def apply(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """x [n, h_in] bfloat16 → x·ΔŴᵀ [n, h_out] bfloat16 (copied into `out` when given)."""
        h_out, h_in = self.shape
        if self.a8.shape[1] != h_in:
            x = torch.nn.functional.pad(x, (0, self.a8.shape[1] - h_in))
        y = torch._weight_int8pack_mm(torch._weight_int8pack_mm(x.contiguous(), self.a8, self.mid), self.b8, self.ones)
        if y.shape[1] != h_out:
            y = y[:, :h_out]
        return y if out is None else out.copy_(y)

    def rows(self, positions: torch.Tensor) -> torch.Tensor:
        """Rows ΔŴ[positions] [T, h_in] float32: (b8[positions] ⊙ mid)·a8 (an embedding lookup)."""
        u = self.b8.index_select(0, positions).float() * self.mid.float()
        return (u @ self.a8.float())[:, :self.shape[1]]


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


def int8_factors(p: PackedLinear) -> Int8Factors | None:
    """The rank blocks of `p` as Int8Factors, or None when a block has no exact int8 form (see the
    module docstring). The codes are unpacked once here; nothing is rounded except mid to bfloat16."""
    if p.sign is not None or p.rank == 0:
        return None
    a8, mid, b8 = [], [], []
    for b in p.blocks:
        if not (b.v.fused_rows() and b.u.fused_rows() and b.u_transposed):
            return None
        centred = []
        for m in (b.v, b.u):
            c = m.codes_f32() - m.row_params()[1]                  # exact: integers below 2^24
            if c.abs().max() > 127:
                return None
            centred.append(c.to(torch.int8))
        a8.append(centred[0])
        b8.append(centred[1])
        scale = b.v.row_params()[0][:, 0] * b.u.row_params()[0][:, 0]
        mid.append(scale * (b.sigma.float() if b.sigma is not None else 1.0))
    h_out, h_in = p.shape
    a8, b8, mid = torch.cat(a8), torch.cat(b8).T, torch.cat(mid)
    r = a8.shape[0]
    pad = torch.nn.functional.pad
    return Int8Factors((h_out, h_in), pad(a8, (0, _pad_to(h_in) - h_in, 0, _pad_to(r) - r)).contiguous(),
                       pad(mid, (0, _pad_to(r) - r)).to(torch.bfloat16),
                       pad(b8, (0, _pad_to(r) - r, 0, _pad_to(h_out) - h_out)).contiguous(),
                       torch.ones(_pad_to(h_out), dtype=torch.bfloat16, device=mid.device))


def cached_factors(p: PackedLinear, dtype: torch.dtype) -> DenseFactors | Int8Factors:
    """The factors a FactorCache of `dtype` keeps for `p`: Int8Factors for torch.int8 where exact,
    else DenseFactors in dtype (float32 when dtype is int8)."""
    if dtype == torch.int8:
        return int8_factors(p) or dense_factors(p, torch.float32)
    return dense_factors(p, dtype)


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
        self._entries: OrderedDict[Hashable, tuple[DenseFactors | Int8Factors, int]] = OrderedDict()
        self.used_bytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def get(self, key: Hashable, packed: PackedLinear, batch_id: int = -1) -> DenseFactors | Int8Factors | None:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries[key] = (entry[0], batch_id)
            self._entries.move_to_end(key)
            self.hits += 1
            return entry[0]
        self.misses += 1
        if not self._make_room(self.expected_nbytes(packed), batch_id):
            return None
        factors = cached_factors(packed, self.dtype)
        if not self._make_room(factors.nbytes(), batch_id):     # larger than expected (int8 fell back)
            return None
        self._entries[key] = (factors, batch_id)
        self.used_bytes += factors.nbytes()
        return factors

    def expected_nbytes(self, p: PackedLinear) -> int:
        """What cached_factors(p, dtype) will take, from the shapes alone (exact unless an int8 layout has
        8-bit codes outside int8: then float32 factors, larger)."""
        h_out, h_in = p.shape
        r = p.rank
        if self.dtype == torch.int8 and all(b.v.fused_rows() and b.u.fused_rows() and b.u_transposed
                                             for b in p.blocks):
            r, h_in, h_out = _pad_to(r), _pad_to(h_in), _pad_to(h_out)
            return r * (h_in + h_out) + 2 * (r + h_out)
        item = 4 if self.dtype == torch.int8 else torch.empty(0, dtype=self.dtype).element_size()
        return r * (h_in + h_out) * item

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
