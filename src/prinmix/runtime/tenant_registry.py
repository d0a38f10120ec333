"""Tenants resident on the device within a byte budget (DeltaZip-style swapping).

`TenantRegistry` keeps every registered tenant's payloads in host memory and the most recently
used tenants resident on the device, evicting the least recently used ones to fit `budget_bytes`.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Iterable

import torch
from torch import nn

from ..errors import PrinmixError

__all__ = ["TenantRegistry"]


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
        # a payload shared by two modules is copied once; on the CPU the host payload itself is loaded (there is
        # nothing to copy, and re-wrapping its ~400 blocks took 32 ms a SmolLM2 tenant)
        moved: dict[int, object] = {}
        for m, payload in self._host[name].items():
            if id(payload) not in moved:
                moved[id(payload)] = payload if self.device.type == "cpu" else payload.to(self.device)
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
