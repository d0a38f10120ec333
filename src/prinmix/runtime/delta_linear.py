"""A base nn.Linear shared by many tenants, each adding its packed compressed delta per row.

y = x Wᵀ (+ b) runs once for the whole batch (one GEMM); then, for the rows of each tenant
(grouped by slot, as in Punica/S-LoRA SGMV and vLLM's lora_shrink/lora_expand):
    shrink  t = x V̂ᵀ            per rank block, codes dequantised on the fly  [n, k]
    expand  y += (t ⊙ σ) Ûᵀ     over the tenant's blocks                       [n, h_out]
ΔW is never formed; rows of slot −1 (the base model) cost nothing extra. BitDelta tenants add
s · x (2·bits − 1)ᵀ with the sign bits unpacked on the fly.

Four implementations (`backend`):
    torch   the reference: unpacks the packed codes at every call (any device)
    packed  the fast CPU path: one call of the fused C++ kernel for all tenants' rows, reading the packed
            codes directly (runtime/packed_kernel.py; tenants in PrinMix's layout, the others by the reference)
    cached  each (tenant, linear) as two dense GEMMs from a shared FactorCache (runtime/factor_cache.py:
            dequantised factors of the hottest tenants within a byte budget)
    triton  kernels unpacking codes in registers from the stacked buffers of all tenants
            (runtime/triton_kernels.py, runtime/packed.py)
"auto" picks triton for CUDA inputs when Triton is installed; on CPU packed when the kernel builds
(faster than the factor cache at a third of its memory, benchmarks/README.md), else cached when the
layer has a FactorCache, else torch. Every fast path is tested against the torch reference.
"""

from __future__ import annotations

import itertools
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from ..errors import PrinmixError
from .factor_cache import FactorCache, dense_factors
from .packed import PackedLinear, StackedPacks, stack_tenants
from .packed_kernel import (
    PackedTable,
    add_dense_deltas,
    add_packed_deltas,
    dequantized_factors,
    kernel_available,
    packed_delta,
)
from .tenant_registry import TenantRegistry

__all__ = ["BASE_SLOT", "DeltaLinear", "runs_packed_kernel", "single_threaded", "TenantDelta", "RowGroups", "TenantBatch", "TenantContext",
           "TenantRegistry", "triton_available"]

BASE_SLOT = -1
SIGN_ROWS_PER_CHUNK = 1024     # torch BitDelta path: output rows unpacked at a time (multiple of 8)
SINGLE_THREAD_ROWS = 4         # cached path: tenants with at most this many rows (decode) run single-threaded
# packed path: a tenant with at least this many rows (a prefill) is multiplied by two float32 GEMMs on its factors
# dequantised once, not by the fused kernel, which decodes every code once per 4 rows. Measured on SmolLM2's 1/16
# delta (210 linears of one tenant, bf16 rows, 2 threads): fused 29.6 / 36.3 / 131 ms at 12 / 16 / 64 rows against
# 26.3 / 27.1 / 52 ms dequantised; at 8 rows 20.5 against 22.5 ms.
DENSE_MIN_ROWS = 12


@contextmanager
def single_threaded(on: bool = True):
    """torch's intra-op threads set to 1 inside (restored after). The cached path's decode products are
    thousands of GEMMs of one row reading ~40 KB of factors each from memory: split over 2 threads each
    call pays a fork/join and waits for the slower thread; measured on the 2 shared cores (loaded), 2 int4
    GEMMs of a [576, 576] rank-128 delta streaming from DRAM: 13–18 µs on 1 thread, 25–63 µs on 2
    (benchmarks/README.md)."""
    n = torch.get_num_threads()
    if not on or n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def runs_packed_kernel(backend: str, device) -> bool:
    """Whether `backend` ("packed", or "auto") multiplies on `device` with the packed C++ kernel: CPU, kernel built."""
    return backend in ("packed", "auto") and torch.device(device).type == "cpu" and kernel_available()


# ---- which rows belong to which tenant ---------------------------------------------------------

class RowGroups:
    """The rows of a flattened activation [n_rows, ...] grouped by tenant slot, base rows left out.

    order    int64 [n_delta_rows]  row indices sorted by slot (stable)
    segments list of (slot, start, length) into `order`, slots ascending
    """

    def __init__(self, row_slots: torch.Tensor, device):
        row_slots = row_slots.to("cpu", torch.int64)
        order = torch.argsort(row_slots, stable=True)
        order = order[row_slots[order] != BASE_SLOT]
        slots, counts = torch.unique_consecutive(row_slots[order], return_counts=True)
        starts = torch.cumsum(counts, 0) - counts
        self.segments = list(zip(slots.tolist(), starts.tolist(), counts.tolist()))
        self.order = order.to(device)
        self.max_len = int(counts.max()) if counts.numel() else 0
        self._device = device
        self._seg_tensors = None
        self._kernel_split: dict = {}

    def __bool__(self) -> bool:
        return bool(self.segments)

    def rows_of(self, start: int, length: int) -> torch.Tensor:
        return self.order[start:start + length]

    def kernel_split(self, fused_slots: frozenset, tenant_slots: frozenset, max_fused_rows: int
                     ) -> tuple[torch.Tensor, torch.Tensor, list]:
        """The segments of the packed kernel's calls and the rest, as (start, length, slot): int64 [S, 3] of the
        slots in `fused_slots` with at most `max_fused_rows` rows (the fused call), the same with more rows (the
        dequantised-factor call), and a list of the other slots in `tenant_slots`. Computed once per key — every
        linear of one kind shares it — not once per linear and step."""
        key = (fused_slots, tenant_slots, max_fused_rows)
        if key not in self._kernel_split:
            fused = [(a, n, s) for s, a, n in self.segments if s in fused_slots and n <= max_fused_rows]
            dense = [(a, n, s) for s, a, n in self.segments if s in fused_slots and n > max_fused_rows]
            other = [(a, n, s) for s, a, n in self.segments if s in tenant_slots and s not in fused_slots]
            self._kernel_split[key] = tuple(torch.tensor(t, dtype=torch.int64).reshape(-1, 3)
                                            for t in (fused, dense)) + (other,)
        return self._kernel_split[key]

    def seg_tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(start, length, slot) int32 [n_segments] on the device, for the kernels."""
        if self._seg_tensors is None:
            seg = torch.tensor(self.segments, dtype=torch.int32).reshape(-1, 3)
            self._seg_tensors = tuple(seg[:, i].contiguous().to(self._device) for i in (1, 2, 0))
        return self._seg_tensors


class TenantBatch:
    """The tenant slot of every sequence (or row) of one forward pass.

    An activation of n_rows rows (all leading dims flattened, batch first) gives each sequence
    n_rows // n_seqs consecutive rows; the row grouping is computed once per (n_rows, device).
    `serial` is unique per batch object (the FactorCache keeps a batch's entries while it runs).
    """

    _serials = itertools.count()

    def __init__(self, seq_slots: Sequence[int] | torch.Tensor):
        self.seq_slots = torch.as_tensor(seq_slots, dtype=torch.int64).reshape(-1).cpu()
        self.serial = next(TenantBatch._serials)
        self._groups: dict = {}

    def __len__(self) -> int:
        return self.seq_slots.numel()

    def rows(self, n_rows: int, device) -> RowGroups:
        key = (n_rows, str(device))
        if key not in self._groups:
            self._groups[key] = RowGroups(self.seq_slots.repeat_interleave(self._rows_per_seq(n_rows)), device)
        return self._groups[key]

    def table_rows(self, n_rows: int, n_table: int, device) -> torch.Tensor:
        """int64 [n_rows] on `device`: each row's slot + 1, or 0 for the base's rows and slots ≥ n_table − 1 — the
        rows of a per-tenant parameter table [n_table, ...] whose row 0 is the base's (PerTenantParams). Computed
        once per (n_rows, n_table, device)."""
        key = ("table rows", n_rows, n_table, str(device))
        if key not in self._groups:
            index = (self.seq_slots + 1).repeat_interleave(self._rows_per_seq(n_rows))
            self._groups[key] = torch.where(index < n_table, index, 0).to(device)
        return self._groups[key]

    def _rows_per_seq(self, n_rows: int) -> int:
        n_seqs = len(self)
        if n_seqs == 0 or n_rows % n_seqs:
            raise PrinmixError(f"activation with {n_rows} rows does not split into {n_seqs} sequences")
        return n_rows // n_seqs


class TenantContext:
    """Shared by the tenant-aware modules of one model: the batch being run (None = base only)."""

    def __init__(self):
        self.batch: TenantBatch | None = None


# ---- the per-tenant payload of one linear ------------------------------------------------------

@dataclass
class TenantDelta:
    """What one tenant adds to one linear: a packed low-rank/sign delta and/or a bias delta (float32 [h_out])."""

    packed: PackedLinear | None = None
    bias: torch.Tensor | None = None

    def nbytes(self) -> int:
        b = 0 if self.bias is None else self.bias.numel() * self.bias.element_size()
        return b + (self.packed.resident_bytes if self.packed is not None else 0)

    def to(self, device) -> "TenantDelta":
        return TenantDelta(None if self.packed is None else self.packed.to(device),
                           None if self.bias is None else self.bias.to(device))


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


class DeltaLinear(nn.Module):
    """`base` (an nn.Linear, shared) plus the packed deltas of N tenants indexed by integer slot.

    backend: "torch" (reference), "packed" (the C++ kernel on the packed codes; CPU), "cached" (dense factors
    from `factor_cache`; without one, built per call), "triton" (kernels; CUDA tensors, or CPU under
    TRITON_INTERPRET=1) or "auto" (triton for CUDA inputs when it is installed, packed for CPU inputs when the
    kernel builds, else cached when a factor_cache is given, else torch).
    factor_cache: shared by the layers of one model, so that its byte budget is the model's.
    """

    BACKENDS = ("auto", "torch", "packed", "cached", "triton")

    def __init__(self, base: nn.Linear, context: TenantContext | None = None, backend: str = "auto",
                 factor_cache: FactorCache | None = None):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise PrinmixError(f"DeltaLinear wraps nn.Linear, got {type(base).__name__}")
        self.base = base
        self.context = context
        if backend not in self.BACKENDS:
            raise PrinmixError(f"unknown DeltaLinear backend {backend!r}: use {', '.join(self.BACKENDS)}")
        self.backend = backend
        self.factor_cache = factor_cache
        self.tenants: dict[int, TenantDelta] = {}
        self._stack: StackedPacks | None = None
        self._table: PackedTable | None = None
        self._kernel_slots: tuple[frozenset, frozenset] = (frozenset(), frozenset())

    # nn.Linear's attributes, for code that inspects the module
    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def extra_repr(self) -> str:
        return f"tenants={sorted(self.tenants)}, backend={self.backend}"

    # ---- tenants -------------------------------------------------------------------------------
    def load_tenant(self, slot: int, delta: TenantDelta) -> None:
        """Make `delta` this layer's delta for `slot` (moved to the base weight's device)."""
        if slot < 0:
            raise PrinmixError(f"tenant slot must be >= 0, got {slot}")
        if delta.packed is not None and tuple(delta.packed.shape) != (self.out_features, self.in_features):
            raise PrinmixError(f"delta of shape {list(delta.packed.shape)} does not fit a linear of "
                               f"[{self.out_features}, {self.in_features}]")
        self.tenants[slot] = delta.to(self.base.weight.device)
        self._stack = self._table = None
        if self.factor_cache is not None:
            self.factor_cache.drop((id(self), slot))

    def unload_tenant(self, slot: int) -> None:
        if self.tenants.pop(slot, None) is not None:
            self._stack = self._table = None
            if self.factor_cache is not None:
                self.factor_cache.drop((id(self), slot))

    def resident_bytes(self, slot: int) -> int:
        d = self.tenants.get(slot)
        return 0 if d is None else d.nbytes()

    def stacked(self) -> StackedPacks:
        """The tenants' packed deltas in flat buffers (built on first use after a change)."""
        if self._stack is None:
            packs = {s: d.packed for s, d in self.tenants.items() if d.packed is not None}
            self._stack = stack_tenants(packs, self.base.weight.device)
        return self._stack

    def packed_table(self) -> PackedTable:
        """The kernel's block table of the tenants' packed deltas (built on first use after a change)."""
        if self._table is None:
            self._table = PackedTable.build({s: d.packed for s, d in self.tenants.items() if d.packed is not None})
            # (slots the kernel adds in its call: in the table, no bias delta; slots with a delta here)
            self._kernel_slots = (frozenset(s for s in self._table.slots if self.tenants[s].bias is None),
                                  frozenset(self.tenants))
        return self._table

    # ---- forward -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, tenant_slot=None) -> torch.Tensor:
        """x [T, in] or [B, S, in]; tenant_slot: int tensor/list per row (T) or per sequence (B), −1 = base;
        None takes the batch from the shared context. Returns x Wᵀ + b (+ each row's tenant delta)."""
        y = self.base(x)
        if not self.tenants:
            return y
        batch = self._batch(tenant_slot)
        if batch is None:
            return y
        groups = batch.rows(x.numel() // self.in_features if self.in_features else 0, x.device)
        if not groups:
            return y
        rows_x = x.reshape(-1, self.in_features)
        rows_y = y.view(-1, self.out_features)
        backend = self._backend_for(x)
        if backend == "triton":
            from .triton_kernels import add_deltas

            add_deltas(rows_x, rows_y, groups, self.stacked())
            self._add_bias(rows_y, groups)
        elif backend == "packed":
            self._add_deltas_packed(rows_x, rows_y, groups)
        elif backend == "cached":
            with single_threaded(groups.max_len <= SINGLE_THREAD_ROWS):
                self._add_deltas_cached(rows_x, rows_y, groups, batch.serial)
        else:
            self._add_deltas_torch(rows_x, rows_y, groups)
        return y

    def _batch(self, tenant_slot) -> TenantBatch | None:
        if tenant_slot is None:
            return self.context.batch if self.context is not None else None
        return tenant_slot if isinstance(tenant_slot, TenantBatch) else TenantBatch(tenant_slot)

    def _backend_for(self, x: torch.Tensor) -> str:
        if runs_packed_kernel(self.backend, x.device):
            return "packed"
        if self.backend == "packed":
            return "torch"                # no kernel here (load_kernel logged why): the reference
        if self.backend != "auto":
            return self.backend
        if x.is_cuda and triton_available():
            return "triton"
        return "cached" if self.factor_cache is not None else "torch"

    def _add_bias(self, rows_y: torch.Tensor, groups: RowGroups) -> None:
        for slot, start, length in groups.segments:
            d = self.tenants.get(slot)
            if d is not None and d.bias is not None:
                idx = groups.rows_of(start, length)
                rows_y.index_copy_(0, idx, (rows_y.index_select(0, idx).float() + d.bias).to(rows_y.dtype))

    def _add_deltas_torch(self, rows_x: torch.Tensor, rows_y: torch.Tensor, groups: RowGroups) -> None:
        for slot, start, length in groups.segments:
            d = self.tenants.get(slot)
            if d is None:
                continue
            idx = groups.rows_of(start, length)
            xs = rows_x.index_select(0, idx).float()
            acc = rows_y.index_select(0, idx).float()
            if d.packed is not None:
                acc += self._delta_rows(d.packed, xs)
            if d.bias is not None:
                acc += d.bias
            rows_y.index_copy_(0, idx, acc.to(rows_y.dtype))

    def _add_deltas_cached(self, rows_x: torch.Tensor, rows_y: torch.Tensor, groups: RowGroups,
                           batch_id: int) -> None:
        """The fast CPU path: one gather of the delta rows, two GEMMs per tenant with its cached factors,
        one concatenation of the tenants' products and one gather-add-scatter of y in float32 (as the
        reference rounds: y + Δ once). Sign deltas, and deltas the cache has no room for, use the
        reference's product from the packed codes. Per tenant only the two GEMMs run as tensor ops
        (the rows of each tenant are views from one split per input dtype)."""
        xs = rows_x.index_select(0, groups.order)
        lengths = [n for _, _, n in groups.segments]
        by_dtype = {}                                   # the delta rows in each factor kind's input dtype, split
        parts = []
        for i, (slot, _, length) in enumerate(groups.segments):
            d = self.tenants.get(slot)
            factors = part = None
            if d is not None and d.packed is not None and d.packed.blocks:   # blocks of rank > 0
                factors = (self.factor_cache.get((id(self), slot), d.packed, batch_id)
                           if self.factor_cache is not None else dense_factors(d.packed))
            if factors is not None:
                dtype = factors.input_dtype
                if dtype not in by_dtype:
                    by_dtype[dtype] = xs.to(dtype).split(lengths)
                part = factors.apply(by_dtype[dtype][i])
            elif d is not None and d.packed is not None and (d.packed.sign is not None or d.packed.blocks):
                part = self._delta_rows(d.packed, xs.float().split(lengths)[i])  # signs; no room in the cache
            if d is not None and d.bias is not None:
                part = d.bias.expand(length, -1) if part is None else part.float() + d.bias
            parts.append(part if part is not None else xs.new_zeros(length, self.out_features, dtype=torch.float32))
        acc = rows_y.index_select(0, groups.order).float() + torch.cat(parts).float()
        rows_y.index_copy_(0, groups.order, acc.to(rows_y.dtype))

    def _add_deltas_packed(self, rows_x: torch.Tensor, rows_y: torch.Tensor, groups: RowGroups) -> None:
        """The fused CPU path: one kernel call adds the deltas of every tenant the kernel supports straight into
        y (rows gathered, multiplied in float32 and added with one rounding inside the kernel, as the reference
        rounds), a tenant with ≥ DENSE_MIN_ROWS rows (a prefill) by the kernel's other call, which dequantises
        its factors once and runs two float32 GEMMs; tenants with a bias delta, sign deltas and other layouts go
        through a float32 gather-add-scatter (the kernel's product — on dequantised factors from DENSE_MIN_ROWS
        rows on — or the reference's)."""
        table = self.packed_table()
        fused, dense, other = groups.kernel_split(*self._kernel_slots, DENSE_MIN_ROWS - 1)
        rows_x = rows_x.contiguous()
        add_packed_deltas(rows_x, rows_y, groups.order, fused, table)
        add_dense_deltas(rows_x, rows_y, groups.order, dense, table)
        for start, n, slot in other:
            d = self.tenants[slot]
            idx = groups.rows_of(start, n)
            acc = rows_y.index_select(0, idx).float()
            if slot in table.slots and n >= DENSE_MIN_ROWS:
                a, b = dequantized_factors(table, slot, self.in_features)
                acc += (rows_x.index_select(0, idx).float() @ a.T) @ b
            elif slot in table.slots:
                acc += packed_delta(rows_x.index_select(0, idx), table, slot)
            elif d.packed is not None and (d.packed.sign is not None or d.packed.blocks):
                acc += self._delta_rows(d.packed, rows_x.index_select(0, idx).float())
            if d.bias is not None:
                acc += d.bias
            rows_y.index_copy_(0, idx, acc.to(rows_y.dtype))

    def _delta_rows(self, p: PackedLinear, xs: torch.Tensor) -> torch.Tensor:
        """xs ΔŴᵀ [n, h_out] in float32, from the packed factors (reference path)."""
        h_out, h_in = p.shape
        out = torch.zeros(xs.shape[0], h_out, device=xs.device)
        if p.sign is not None:
            for r0 in range(0, h_out, SIGN_ROWS_PER_CHUNK):
                r1 = min(h_out, r0 + SIGN_ROWS_PER_CHUNK)
                if r0 * h_in % 8:       # keep chunks byte-aligned
                    raise AssertionError("SIGN_ROWS_PER_CHUNK must be a multiple of 8")
                out[:, r0:r1] = xs @ p.sign.signs(r0, r1, h_in).T
            return out * p.sign.scale.float()
        for b in p.blocks:
            # per-row-quantised factors (PrinMix's V̂ and stored-transposed Û) are applied to the codes with
            # the scales and zero points folded around the product: no dequantised copy of the factor
            t = b.v.matmul_t(xs) if b.v.fused_rows() else xs @ b.v_matrix().T           # shrink [n, k]
            if b.sigma is not None:
                t = t * b.sigma.float()
            if b.u_transposed and b.u.fused_rows():
                out += b.u.matmul(t)                                                    # expand [n, h_out]
            else:
                out += t @ b.u_matrix().T
        return out
