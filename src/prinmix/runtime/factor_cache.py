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

__all__ = ["DenseFactors", "FactorCache", "Int4Factors", "Int8Factors", "dense_factors", "int4_factors",
           "int8_factors"]


@dataclass
class DenseFactors:
    """One tenant's delta of one linear as x·ΔŴᵀ = (x·Aᵀ)·B: a [r, h_in], b [r, h_out], same dtype."""

    a: torch.Tensor
    b: torch.Tensor

    has_rows = True         # rows(positions) serves an embedding lookup

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


def _pad(n: int, to: int) -> int:
    """n rounded up to a multiple of `to`."""
    return -(-n // to) * to


def _pad_to(n: int) -> int:
    return _pad(n, INT8_PAD)


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
    has_rows = True

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


INT4_PAD_K = 32          # the int4 kernel's contraction dim is a multiple of its group size (32 at least)
INT4_PAD_N = 16          # its output dim: _convert_weight_to_int4pack_for_cpu refuses other N
INT4_GROUPS = (256, 128, 64, 32)    # the group sizes torch 2.13's CPU kernel takes; the largest dividing K


def _int4_group(k: int) -> int:
    return next(g for g in INT4_GROUPS if k % g == 0)


_INT4_UNIT_SCALES: dict = {}


def _int4_unit_scales(groups: int, n: int, device) -> torch.Tensor:
    """bfloat16 [groups, n, 2] of (scale 1, zero 0), shared by every expand of that shape (the kernel reads
    a contiguous tensor; a stride-0 view gives NaN)."""
    key = (groups, n, str(device))
    if key not in _INT4_UNIT_SCALES:
        t = torch.zeros(groups, n, 2, dtype=torch.bfloat16, device=device)
        t[..., 0] = 1
        _INT4_UNIT_SCALES[key] = t
    return _INT4_UNIT_SCALES[key]


@dataclass
class Int4Factors:
    """One tenant's delta of one linear [h_out, h_in] as x·ΔŴᵀ = [(x·a4ᵀ) ⊙ mid]·b4ᵀ in torch's CPU int4
    weight-only GEMM (`torch._weight_int4pack_mm_for_cpu`, value = (q − 8)·scale + zero per (K group, row)).

    The entries are those of Int8Factors split so that every one lies in [−8, 7] (module docstring): e rows
    (e ≥ r) zero-padded to e' (multiple of INT4_PAD_K), h_in to h_in' (INT4_PAD_K), h_out to h_out'
    (INT4_PAD_N). a4: the packed shrink [e', h_in'] (uint8, the kernel's layout), a_scales bfloat16
    [h_in'/a_group, e', 2] (scale mid of the entry's rank, zero 0); b4: the packed expand [h_out', e'],
    b_scales scale 1 and zero 0 (a tensor shared by all tenants of that shape, not counted in nbytes);
    rest: the int8 remainder (ranks whose codes split into too many parts) or None."""

    shape: tuple[int, int]
    a4: torch.Tensor
    a_scales: torch.Tensor
    a_group: int
    b4: torch.Tensor
    b_group: int
    b_scales: torch.Tensor
    entries: int
    rest: Int8Factors | None = None

    input_dtype = torch.bfloat16
    has_rows = False        # no row access into the kernel's packed layout: lookups read the packed codes

    @property
    def k_in(self) -> int:
        """h_in zero-padded (the shrink's contraction dim)."""
        return self.a_scales.shape[0] * self.a_group

    def nbytes(self) -> int:
        own = sum(t.numel() * t.element_size() for t in (self.a4, self.a_scales, self.b4))
        return own + (self.rest.nbytes() if self.rest is not None else 0)

    def apply(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """x [n, h_in] bfloat16 → x·ΔŴᵀ [n, h_out] bfloat16 (copied into `out` when given)."""
        h_out, h_in = self.shape
        if self.k_in != h_in:
            x = torch.nn.functional.pad(x, (0, self.k_in - h_in))
        t = torch._weight_int4pack_mm_for_cpu(x.contiguous(), self.a4, self.a_group, self.a_scales)
        y = torch._weight_int4pack_mm_for_cpu(t, self.b4, self.b_group, self.b_scales)
        if y.shape[1] != h_out:
            y = y[:, :h_out]
        if self.rest is not None:
            y = y + self.rest.apply(x[:, :h_in])
        return y if out is None else out.copy_(y)


def _int4_part_counts(c: torch.Tensor) -> torch.Tensor:
    """int64 [k]: the fewest parts in [−8, 7] each row of c [k, n] splits into, max(1, ⌈−min/8⌉, ⌈max/7⌉)."""
    lo, hi = c.min(1).values.long(), c.max(1).values.long()
    return torch.maximum(torch.maximum(-(lo.div(8, rounding_mode="floor")), -((-hi).div(7, rounding_mode="floor"))),
                         torch.ones_like(lo))


def _split_int4(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer rows c [k, n] (|c| ≤ 127) → (parts p [k] int64, the parts [Σ p, n] int8): row j is the sum of
    its p_j parts floor((c_j + i) / p_j), i = 0…p_j − 1 (Hermite's identity), each in [−8, 7] since
    p_j = max(1, ⌈−min c_j / 8⌉, ⌈max c_j / 7⌉). Parts of row j are consecutive."""
    p = _int4_part_counts(c)
    rows = torch.repeat_interleave(torch.arange(c.shape[0], device=c.device), p)
    i = torch.arange(rows.numel(), device=c.device) - torch.repeat_interleave(torch.cumsum(p, 0) - p, p)
    parts = (c[rows] + i[:, None]).div(p[rows][:, None], rounding_mode="floor")
    return p, parts.to(torch.int8)


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


def _integer_layout(p: PackedLinear) -> bool:
    """Every block has per-row scales and zeros on both factors and Û stored transposed: the layout whose
    codes minus zero points are the factors' integers (else no int8 / int4 form)."""
    return all(b.per_row_codes() for b in p.blocks)


def _centred_ranks(p: PackedLinear) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Every rank of `p` as integers: (v int16 [r, h_in] = Cv − zv, u int16 [r, h_out] = Cu − zu (row j: rank
    j's expand column), mid float32 [r] = sv·σ·su), so that ΔŴ = Σ_j mid_j u_jᵀ v_j; None when a block has
    no such form (column-grouped scales, raw 16-bit factors, Û not stored transposed) or |C − z| > 127."""
    if p.sign is not None or p.rank == 0 or not _integer_layout(p):
        return None
    v, u, mid = [], [], []
    for b in p.blocks:
        centred = [m.codes_f32() - m.row_params()[1] for m in (b.v, b.u)]     # exact: integers below 2^24
        if max(float(c.abs().max()) for c in centred) > 127:
            return None
        v.append(centred[0].to(torch.int16))
        u.append(centred[1].to(torch.int16))
        scale = b.v.row_params()[0][:, 0] * b.u.row_params()[0][:, 0]
        mid.append(scale * (b.sigma.float() if b.sigma is not None else 1.0))
    return torch.cat(v), torch.cat(u), torch.cat(mid)


def _int8_of(shape: tuple[int, int], v: torch.Tensor, u: torch.Tensor, mid: torch.Tensor) -> Int8Factors:
    """Int8Factors of the ranks (v [r, h_in], u [r, h_out], mid [r]) of _centred_ranks, zero-padded."""
    h_out, h_in = shape
    r = v.shape[0]
    pad = torch.nn.functional.pad
    return Int8Factors(shape, pad(v.to(torch.int8), (0, _pad_to(h_in) - h_in, 0, _pad_to(r) - r)).contiguous(),
                       pad(mid, (0, _pad_to(r) - r)).to(torch.bfloat16),
                       pad(u.to(torch.int8).T, (0, _pad_to(r) - r, 0, _pad_to(h_out) - h_out)).contiguous(),
                       torch.ones(_pad_to(h_out), dtype=torch.bfloat16, device=mid.device))


def int8_factors(p: PackedLinear) -> Int8Factors | None:
    """The rank blocks of `p` as Int8Factors, or None when a block has no exact int8 form (see the
    module docstring). The codes are unpacked once here; nothing is rounded except mid to bfloat16."""
    ranks = _centred_ranks(p)
    return None if ranks is None else _int8_of(p.shape, *ranks)


INT4_REST_MIN_BYTES = 64 << 10   # an int8 remainder pays for its two extra GEMM calls (~5 µs each) only
                                 # when it saves at least this much int4 reading (~5 µs at ~13 GB/s)


def _int4_bytes(entries: int, h_in: int, h_out: int) -> int:
    e, k_in, n_out = _pad(entries, INT4_PAD_K), _pad(h_in, INT4_PAD_K), _pad(h_out, INT4_PAD_N)
    return e * (k_in + n_out) // 2 + 4 * e * (k_in // _int4_group(k_in))


def _int8_bytes(r: int, h_in: int, h_out: int) -> int:
    return _pad_to(r) * (_pad_to(h_in) + _pad_to(h_out)) + 2 * (_pad_to(r) + _pad_to(h_out))


def int4_factors(p: PackedLinear, rest_min_bytes: int = INT4_REST_MIN_BYTES,
                 smaller_only: bool = True) -> Int4Factors | None:
    """The rank blocks of `p` as Int4Factors (with an Int8Factors remainder where that reads fewer bytes),
    or None when `p` has no exact integer form (as int8_factors) or int4 would not read fewer bytes.

    Rank j (shrink row v_j, expand column u_j, integers; _centred_ranks) becomes the pv_j·pu_j entries
    (v_j part a, u_j part b), v_j = Σ_a parts, u_j = Σ_b parts (_split_int4): Σ_a Σ_b (x·v_jᵃ) u_jᵇ = (x·v_j) u_j
    exactly. Widths ≤ 3 (|C − z| ≤ 7) take one entry a rank; a rank of pv_j·pu_j > 2 entries (wide codes:
    more int4 bytes than its int8 form) goes to the int8 remainder when the remainder saves at least
    `rest_min_bytes` (default INT4_REST_MIN_BYTES), else stays split. smaller_only=False builds them
    even where Int8Factors would be smaller (tests: every width in int4)."""
    ranks = _centred_ranks(p)
    if ranks is None:
        return None
    v, u, mid = ranks
    h_out, h_in = p.shape
    cost = _int4_part_counts(v) * _int4_part_counts(u)
    in4 = cost <= 2
    saved = int(((cost[~in4] - 2) * (h_in + h_out)).sum()) // 2
    if saved < rest_min_bytes:
        in4[:] = True
    rest = None if bool(in4.all()) else _int8_of(p.shape, v[~in4], u[~in4], mid[~in4])
    if not in4.any():
        return None
    v, u, mid = v[in4], u[in4], mid[in4]
    (pv, v_parts), (pu, u_parts) = _split_int4(v), _split_int4(u)
    n = pv * pu                                                   # entries of each rank
    rank = torch.repeat_interleave(torch.arange(v.shape[0], device=v.device), n)
    within = torch.arange(rank.numel(), device=v.device) - torch.repeat_interleave(torch.cumsum(n, 0) - n, n)
    v_rows = v_parts[(torch.cumsum(pv, 0) - pv)[rank] + within // pu[rank]]
    u_rows = u_parts[(torch.cumsum(pu, 0) - pu)[rank] + within % pu[rank]]
    e = rank.numel()
    if smaller_only and _int4_bytes(e, h_in, h_out) + (rest.nbytes() if rest is not None else 0) \
            >= _int8_bytes(p.rank, h_in, h_out):
        return None
    e_pad, k_in, n_out = _pad(e, INT4_PAD_K), _pad(h_in, INT4_PAD_K), _pad(h_out, INT4_PAD_N)
    a_group = _int4_group(k_in)
    pad = torch.nn.functional.pad
    a = pad(v_rows.to(torch.int32) + 8, (0, k_in - h_in, 0, e_pad - e), value=8)        # q − 8 = the part
    b = pad(u_rows.T.to(torch.int32) + 8, (0, e_pad - e, 0, n_out - h_out), value=8)
    scales = torch.zeros(k_in // a_group, e_pad, 2, dtype=torch.bfloat16, device=v.device)
    scales[:, :e, 0] = mid[rank].to(torch.bfloat16)
    b_group = _int4_group(e_pad)
    return Int4Factors((h_out, h_in), torch._convert_weight_to_int4pack_for_cpu(a.contiguous(), 1), scales, a_group,
                       torch._convert_weight_to_int4pack_for_cpu(b.contiguous(), 1), b_group,
                       _int4_unit_scales(e_pad // b_group, n_out, v.device), e, rest)


def cached_factors(p: PackedLinear, dtype: torch.dtype) -> DenseFactors | Int8Factors | Int4Factors:
    """The factors a FactorCache of `dtype` keeps for `p`: for torch.int4 Int4Factors where exact and
    smaller, else as for torch.int8: Int8Factors where exact, else float32 DenseFactors; DenseFactors in
    dtype for a float dtype."""
    if dtype == torch.int4:
        return int4_factors(p) or int8_factors(p) or dense_factors(p, torch.float32)
    if dtype == torch.int8:
        return int8_factors(p) or dense_factors(p, torch.float32)
    return dense_factors(p, dtype)


class FactorCache:
    """LRU of factors (cached_factors of `dtype`: torch.int4, torch.int8 or a float dtype) keyed by (layer key, tenant slot), at most `budget_bytes` in all.

    get(key, packed, batch_id) returns the factors (cached, or built for this call only), counting
    hits and misses; drop(key) forgets an entry (its tenant was unloaded or replaced). batch_id names
    the forward pass being run (TenantBatch.serial); its entries are not evicted during it.
    """

    def __init__(self, budget_bytes: int, dtype: torch.dtype = torch.float32):
        if budget_bytes < 0:
            raise ValueError(f"factor cache budget must be >= 0 bytes, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self.dtype = dtype
        self._entries: OrderedDict[Hashable, tuple[DenseFactors | Int8Factors | Int4Factors, int]] = OrderedDict()
        self.used_bytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def get(self, key: Hashable, packed: PackedLinear, batch_id: int = -1) \
            -> DenseFactors | Int8Factors | Int4Factors | None:
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
        8-bit codes outside int8: then float32 factors, larger; for int4 a lower bound, exact when every rank
        takes one entry — widths ≤ 3 — get() makes room again for what was built)."""
        h_out, h_in = p.shape
        r = p.rank
        integer = _integer_layout(p)
        if self.dtype == torch.int4 and integer:
            return min(_int4_bytes(r, h_in, h_out), _int8_bytes(r, h_in, h_out))   # ≤ built: entries ≥ ranks
        if self.dtype == torch.int8 and integer:
            return _int8_bytes(r, h_in, h_out)
        item = 4 if self.dtype in (torch.int8, torch.int4) else torch.empty(0, dtype=self.dtype).element_size()
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
