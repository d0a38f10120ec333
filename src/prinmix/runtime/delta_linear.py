"""A base nn.Linear shared by many tenants, each adding its packed compressed delta per row.

y = x Wᵀ (+ b) runs once for the whole batch (one GEMM); then, for the rows of each tenant
(grouped by slot, as in Punica/S-LoRA SGMV and vLLM's lora_shrink/lora_expand):
    shrink  t = x V̂ᵀ            per rank block, codes dequantised on the fly  [n, k]
    expand  y += (t ⊙ σ) Ûᵀ     over the tenant's blocks                       [n, h_out]
ΔW is never formed; rows of slot −1 (the base model) cost nothing extra. BitDelta tenants add
s · x (2·bits − 1)ᵀ with the sign bits unpacked on the fly.

Two implementations: a pure-torch reference (any device) and Triton kernels (runtime/triton_kernels.py)
that unpack codes in registers from the stacked buffers of all tenants (runtime/packed.py).

`TenantRegistry` keeps every registered tenant's payload in host memory and the most recently
used ones resident on the device within a byte budget (DeltaZip-style swapping).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from torch import nn

from ..errors import PrinmixError
from .packed import PackedLinear, StackedPacks, stack_tenants

BASE_SLOT = -1
SIGN_ROWS_PER_CHUNK = 1024     # torch BitDelta path: output rows unpacked at a time (multiple of 8)


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

    def __bool__(self) -> bool:
        return bool(self.segments)

    def rows_of(self, start: int, length: int) -> torch.Tensor:
        return self.order[start:start + length]

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
    """

    def __init__(self, seq_slots: Sequence[int] | torch.Tensor):
        self.seq_slots = torch.as_tensor(seq_slots, dtype=torch.int64).reshape(-1).cpu()
        self._groups: dict = {}

    def __len__(self) -> int:
        return self.seq_slots.numel()

    def rows(self, n_rows: int, device) -> RowGroups:
        key = (n_rows, str(device))
        if key not in self._groups:
            n_seqs = len(self)
            if n_seqs == 0 or n_rows % n_seqs:
                raise PrinmixError(f"activation with {n_rows} rows does not split into {n_seqs} sequences")
            self._groups[key] = RowGroups(self.seq_slots.repeat_interleave(n_rows // n_seqs), device)
        return self._groups[key]


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

    backend: "torch" (reference), "triton" (kernels; CUDA tensors, or CPU under TRITON_INTERPRET=1)
    or "auto" (triton for CUDA inputs when it is installed, else torch).
    """

    def __init__(self, base: nn.Linear, context: TenantContext | None = None, backend: str = "auto"):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise PrinmixError(f"DeltaLinear wraps nn.Linear, got {type(base).__name__}")
        self.base = base
        self.context = context
        self.backend = backend
        self.tenants: dict[int, TenantDelta] = {}
        self._stack: StackedPacks | None = None

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
        self._stack = None

    def unload_tenant(self, slot: int) -> None:
        if self.tenants.pop(slot, None) is not None:
            self._stack = None

    def resident_bytes(self, slot: int) -> int:
        d = self.tenants.get(slot)
        return 0 if d is None else d.nbytes()

    def stacked(self) -> StackedPacks:
        """The tenants' packed deltas in flat buffers (built on first use after a change)."""
        if self._stack is None:
            packs = {s: d.packed for s, d in self.tenants.items() if d.packed is not None}
            self._stack = stack_tenants(packs, self.base.weight.device)
        return self._stack

    # ---- forward -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, tenant_slot=None) -> torch.Tensor:
        """x [T, in] or [B, S, in]; tenant_slot: int tensor/list per row (T) or per sequence (B), −1 = base;
        None takes the batch from the shared context. Returns x Wᵀ + b (+ each row's tenant delta)."""
        y = self.base(x)
        if not self.tenants:
            return y
        groups = self._row_groups(x, tenant_slot)
        if not groups:
            return y
        rows_x = x.reshape(-1, self.in_features)
        rows_y = y.view(-1, self.out_features)
        if self._use_triton(x):
            from .triton_kernels import add_deltas

            add_deltas(rows_x, rows_y, groups, self.stacked())
            self._add_bias(rows_y, groups)
        else:
            self._add_deltas_torch(rows_x, rows_y, groups)
        return y

    def _row_groups(self, x: torch.Tensor, tenant_slot) -> RowGroups | None:
        n_rows = x.numel() // self.in_features if self.in_features else 0
        if tenant_slot is None:
            batch = self.context.batch if self.context is not None else None
            return None if batch is None else batch.rows(n_rows, x.device)
        if isinstance(tenant_slot, TenantBatch):
            return tenant_slot.rows(n_rows, x.device)
        return TenantBatch(tenant_slot).rows(n_rows, x.device)

    def _use_triton(self, x: torch.Tensor) -> bool:
        if self.backend == "torch":
            return False
        if self.backend == "triton":
            return True
        if self.backend != "auto":
            raise PrinmixError(f"unknown DeltaLinear backend {self.backend!r}: use auto, torch or triton")
        return x.is_cuda and triton_available()

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


# ---- tenants resident on the device within a byte budget ---------------------------------------

class TenantRegistry:
    """Registered tenants' payloads ({module name: payload}) live in host memory; `acquire` makes
    the tenants of a batch resident on `device` (loading them into the modules under a slot) and
    evicts the least recently used others while the resident bytes would exceed `budget_bytes`.

    modules: {module name: module with load_tenant(slot, payload) / unload_tenant(slot) /
    resident_bytes(slot)}; payloads have .to(device) and .nbytes(). The mapping is read at each
    load, so modules added later (a new tenant touching new layers) are found.
    """

    def __init__(self, modules: dict[str, nn.Module], device="cpu", budget_bytes: int | None = None):
        self.modules = modules
        self.device = torch.device(device)
        self.budget_bytes = budget_bytes
        self._host: dict[str, dict[str, object]] = {}
        self._bytes: dict[str, int] = {}
        self._slots: dict[str, int] = {}
        self._lru: OrderedDict[str, None] = OrderedDict()
        self.swaps_in = 0
        self.evictions = 0

    @property
    def names(self) -> list[str]:
        return list(self._host)

    @property
    def resident(self) -> list[str]:
        """Resident tenants, least recently used first."""
        return list(self._lru)

    def __contains__(self, name: str) -> bool:
        return name in self._host

    def register(self, name: str, payloads: dict[str, object]) -> None:
        if name in self._host:
            raise PrinmixError(f"tenant {name!r} is already registered")
        missing = [m for m in payloads if m not in self.modules]
        if missing:
            raise PrinmixError(f"tenant {name!r}: no tenant-aware module {missing[0]!r}")
        size = sum(p.nbytes() for p in {id(p): p for p in payloads.values()}.values())   # shared payloads once
        if self.budget_bytes is not None and size > self.budget_bytes:
            raise PrinmixError(f"tenant {name!r} needs {size} bytes, more than the device budget of "
                               f"{self.budget_bytes} bytes")
        host = {id(p): p.to("cpu") for p in payloads.values()}
        self._host[name] = {m: host[id(p)] for m, p in payloads.items()}
        self._bytes[name] = size

    def unregister(self, name: str) -> None:
        self._require(name)
        if name in self._slots:
            self._evict(name)
        del self._host[name], self._bytes[name]

    def nbytes(self, name: str) -> int:
        """Bytes of the tenant's payload (what residency costs on the device)."""
        self._require(name)
        return self._bytes[name]

    def resident_bytes(self, name: str) -> int:
        """Bytes the tenant holds on the device now (0 when swapped out)."""
        slot = self._slots.get(name)
        if slot is None:
            return 0
        seen, total = set(), 0
        for m, payload in self._host[name].items():
            if id(payload) not in seen:
                seen.add(id(payload))
                total += self.modules[m].resident_bytes(slot)
        return total

    def used_bytes(self) -> int:
        return sum(self._bytes[n] for n in self._slots)

    def slot_of(self, name: str) -> int | None:
        return self._slots.get(name)

    def acquire(self, names: Iterable[str | None]) -> dict[str, int]:
        """Make every named tenant resident (None = base, ignored); returns {name: slot}."""
        need = list(dict.fromkeys(n for n in names if n is not None))
        for n in need:
            self._require(n)
        total = sum(self._bytes[n] for n in need)
        if self.budget_bytes is not None and total > self.budget_bytes:
            raise PrinmixError(f"the batch's {len(need)} tenants need {total} bytes; the device budget is "
                               f"{self.budget_bytes} bytes (run fewer tenants per batch)")
        for n in need:
            if n in self._slots:
                self._lru.move_to_end(n)
        for n in need:
            if n not in self._slots:
                self._make_room(self._bytes[n], keep=set(need))
                self._load(n)
        return {n: self._slots[n] for n in need}

    def _require(self, name: str) -> None:
        if name not in self._host:
            raise PrinmixError(f"unknown tenant {name!r} (registered: {', '.join(self._host) or 'none'})")

    def _make_room(self, size: int, keep: set[str]) -> None:
        if self.budget_bytes is None:
            return
        while self.used_bytes() + size > self.budget_bytes:
            victim = next((n for n in self._lru if n not in keep), None)
            if victim is None:
                raise PrinmixError("internal: no tenant to evict")
            self._evict(victim)

    def _load(self, name: str) -> None:
        used = set(self._slots.values())
        slot = next(s for s in range(len(used) + 1) if s not in used)
        moved: dict[int, object] = {}                 # a payload shared by two modules is copied once
        for m, payload in self._host[name].items():
            if id(payload) not in moved:
                moved[id(payload)] = payload.to(self.device)
            self.modules[m].load_tenant(slot, moved[id(payload)])
        self._slots[name] = slot
        self._lru[name] = None
        self.swaps_in += 1

    def _evict(self, name: str) -> None:
        slot = self._slots.pop(name)
        for m in self._host[name]:
            self.modules[m].unload_tenant(slot)
        del self._lru[name]
        self.evictions += 1
