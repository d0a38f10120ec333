"""The fused unpack-and-multiply CPU kernel (csrc/packed_lowrank.cpp): x·ΔŴᵀ for a batch's tenants of one linear
in one call, read straight from the packed codes that runtime/packed.py keeps (no dequantised copy).

Why this path (benchmarks/README.md, "The fused packed kernel"): the factor cache (factor_cache.py) multiplies
dequantised copies of the factors — int4 ~2×, int8 ~3× the packed bytes a step reads and holds, and two GEMM
calls per (tenant, linear). The kernel reads each tenant's packed codes once per step (PrinMix's widths ~2–3
bits), decodes 64 codes per load with AVX-512 VBMI (16 with AVX-512BW), multiplies bfloat16 activations by
vdpbf16ps where the CPU has AVX512_BF16 (ISA_LEVELS), and runs all tenants of a linear in one call split
over torch's intra-op threads; a resident tenant then costs its packed payload (≈ its delta file) and nothing
else.

What it multiplies: PackedLinears whose every block is in PrinMix's layout (`supported`: codes of 1..8 bits with
one scale / zero point per row on both factors and Û stored transposed). Anything else — BitDelta signs,
column-grouped scales, raw 16-bit factors, Û stored [h_out, k] — is left to the caller's reference path.

How it is built: torch.utils.cpp_extension JIT-compiles the one C++ file (ATen / c10 headers only, no
Python.h: ~8 s with g++ 12) into torch's extension cache (TORCH_EXTENSIONS_DIR, default
~/.cache/torch_extensions) on first use in a process; later processes load the cached library. No compiler,
a failed build, or PRINMIX_PACKED_KERNEL=0 → `load_kernel()` returns None after one log line, and callers
keep the factor-cache / torch path. The code dispatches on the CPU at run time (ISA_LEVELS: AVX-512 with VBMI and
BF16, AVX-512BW, or portable scalar), so one build serves any x86-64 CPU.

Block table (`PackedTable`): int64 [n_slots, max_blocks, len(BLOCK_FIELDS)], one row per (tenant slot, block)
holding the width, rank, rank offset and the addresses / byte lengths of the block's tensors (codes, float16
scales, uint8 zero points, float16 σ or 0). The table keeps references to those tensors, so the addresses stay
valid as long as it lives; it is rebuilt when a tenant is loaded or unloaded.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .packed import PackedLinear

__all__ = ["BLOCK_FIELDS", "ISA_LEVELS", "KERNEL_SOURCE", "PackedTable", "add_dense_deltas", "add_packed_deltas", "add_packed_rows",
           "cpu_isa", "default_isa", "dequantized_factors", "kernel_available", "load_kernel", "packed_delta",
           "supported"]

log = logging.getLogger(__name__)

KERNEL_SOURCE = Path(__file__).resolve().parent.parent / "csrc" / "packed_lowrank.cpp"
BLOCK_FIELDS = ("bits", "k", "rank_off", "v_codes", "v_scale", "v_zero", "v_nbytes", "u_codes", "u_scale", "u_zero",
                "u_nbytes", "sigma")                     # the C++ enum Field, in order
# The kernel's code paths by instruction set, each level including the ones before (the C++ enum Isa): the
# portable scalar code, AVX-512F/BW (16 codes a decode), + VBMI (64 codes a decode), + AVX512_BF16 (vdpbf16ps
# shrink for bfloat16 activations). `isa` arguments name the highest to use; the kernel lowers it to the CPU's.
ISA_LEVELS = ("scalar", "avx512", "vbmi", "bf16")
# PRINMIX_KERNEL_ISA=<level>: the highest path calls use by default (comparing paths in a serving run; an
# unknown name is ignored with a log line at the first call).
_ISA_ENV = "PRINMIX_KERNEL_ISA"
# Split a call's work over torch's intra-op threads (PRINMIX_KERNEL_PARALLEL=0: the calling thread only). On 2
# dedicated cores the split nearly halves a step's kernel time; where other processes share the cores, every
# parallel region waits for the descheduled thread (measured unlocked at load ~4.5: 211 calls of a SmolLM2 step
# for 8 tenants took 3.3 s on 2 threads against 64 ms on 1).
PARALLEL = os.environ.get("PRINMIX_KERNEL_PARALLEL", "1") != "0"
_FLAGS = ["-O3", "-fopenmp"]   # -fopenmp: at::parallel_for's OpenMP region; the process already has torch's libgomp


@functools.cache
def load_kernel():
    """torch.ops.prinmix_packed (the compiled kernel), or None when it cannot be built here (logged once)."""
    if os.environ.get("PRINMIX_PACKED_KERNEL", "1") == "0":
        log.warning("prinmix: packed C++ kernel disabled (PRINMIX_PACKED_KERNEL=0); CPU deltas use the "
                    "factor cache / torch path")
        return None
    try:
        import torch.utils.cpp_extension as cpp_extension  # optional: setuptools, a C++ compiler, ninja

        source = KERNEL_SOURCE.read_bytes()
        tag = hashlib.sha256(source + " ".join(_FLAGS).encode() + torch.__version__.encode()).hexdigest()[:12]
        cpp_extension.load(f"prinmix_packed_{tag}", [str(KERNEL_SOURCE)], extra_cflags=_FLAGS,
                           extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)
        return torch.ops.prinmix_packed
    except Exception as e:                          # noqa: BLE001 — any build failure means "no kernel"
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        log.warning("prinmix: packed C++ kernel unavailable (%s); CPU deltas use the factor cache / torch path",
                    reason[:300])
        return None


def kernel_available() -> bool:
    """Whether the kernel is built (building it on the first call)."""
    return load_kernel() is not None


@functools.cache
def default_isa() -> str:
    """The ISA level calls use unless they name one: PRINMIX_KERNEL_ISA when set to an ISA_LEVELS name, else the
    highest (the kernel lowers it to what the CPU runs)."""
    level = os.environ.get(_ISA_ENV, ISA_LEVELS[-1])
    if level not in ISA_LEVELS:
        log.warning("prinmix: %s=%r is none of %s; the kernel uses its best path", _ISA_ENV, level,
                    ", ".join(ISA_LEVELS))
        return ISA_LEVELS[-1]
    return level


def cpu_isa() -> str:
    """The highest ISA_LEVELS entry this CPU runs (needs kernel_available())."""
    return ISA_LEVELS[load_kernel().cpu_isa()]


def supported(p: PackedLinear) -> bool:
    """Whether the kernel multiplies `p`: rank blocks only (no sign delta), every block in PrinMix's layout."""
    return p.sign is None and p.rank > 0 and all(b.per_row_codes() for b in p.blocks)


def _address(t: torch.Tensor) -> int:
    if not t.is_contiguous() or t.device.type != "cpu":
        raise ValueError("the packed kernel reads contiguous CPU tensors")
    return t.data_ptr()


@dataclass
class PackedTable:
    """The kernel's view of some tenants' deltas of one linear [h_out, h_in] (module docstring): table int64
    [n_slots, max_blocks, len(BLOCK_FIELDS)], n_blocks int64 [n_slots], max_rank (largest Σ_b k_b), slots (those
    present), refs (the tensors whose addresses the table holds), ranks ({slot: Σ_b k_b})."""

    h_out: int
    table: torch.Tensor
    n_blocks: torch.Tensor
    max_rank: int
    slots: frozenset
    refs: list
    ranks: dict

    @classmethod
    def build(cls, tenants: dict[int, PackedLinear]) -> "PackedTable":
        """The table of the `supported` deltas among {slot: PackedLinear}; the others are left out."""
        tenants = {s: p for s, p in tenants.items() if supported(p)}
        n_slots = max(max(tenants, default=-1) + 1, 1)
        max_blocks = max((len(p.blocks) for p in tenants.values()), default=1)
        empty = [0] * len(BLOCK_FIELDS)
        rows = [[empty] * max_blocks for _ in range(n_slots)]
        n_blocks = [0] * n_slots
        refs = []
        for slot, p in tenants.items():          # Python lists, one tensor at the end: a table of 32 tenants × ~4
            n_blocks[slot] = len(p.blocks)       # blocks is rebuilt for every linear after each load / unload
            rank_off = 0
            for i, b in enumerate(p.blocks):
                row = [b.bits, b.rank, rank_off]
                for m in (b.v, b.u):
                    row += [_address(m.data), _address(m.scale), _address(m.zero), m.data.numel()]
                    refs += [m.data, m.scale, m.zero]
                row.append(_address(b.sigma) if b.sigma is not None else 0)
                if b.sigma is not None:
                    refs.append(b.sigma)
                rows[slot][i] = row
                rank_off += b.rank
        table = torch.tensor(rows, dtype=torch.int64)
        n_blocks = torch.tensor(n_blocks, dtype=torch.int64)
        h_out = next(iter(tenants.values())).shape[0] if tenants else 0
        return cls(h_out, table, n_blocks, max((p.rank for p in tenants.values()), default=0), frozenset(tenants), refs,
                   {s: p.rank for s, p in tenants.items()})


def _level(isa: str | None) -> int:
    return ISA_LEVELS.index(isa or default_isa())


def _segment_tensor(segments: list[tuple[int, int, int]] | torch.Tensor) -> torch.Tensor:
    """Segments as the kernel's int64 [S, 3] of (first index, count, slot)."""
    if isinstance(segments, torch.Tensor):
        return segments
    return torch.tensor(segments, dtype=torch.int64).reshape(-1, 3)


def add_packed_deltas(x: torch.Tensor, y: torch.Tensor, rows: torch.Tensor,
                      segments: list[tuple[int, int, int]] | torch.Tensor,
                      table: PackedTable, isa: str | None = None, parallel: bool | None = None,
                      cols: torch.Tensor | None = None) -> None:
    """y[rows[i]] += x[rows[i]]·ΔŴᵀ in place, ΔŴ the delta in `table` of the slot of i's segment, each entry rounded
    once to y's dtype (float32 y + Δ, then cast: the torch reference's rounding). x [N, h_in], y [N, h_out]
    (float32 / bfloat16 / float16, contiguous); rows int64 [n], distinct; segments: (first index into rows, count,
    slot), disjoint (or the same as an int64 tensor [S, 3]). cols: int64 [h_out] strictly increasing — output o
    of ΔŴ goes to column cols[o] of a wider y (a tenant's compressed lm_head rows among all the logits). isa: the highest ISA_LEVELS code path to use,
    lowered to what the CPU runs ("scalar": the portable code; tests and benchmarks force lower ones; None:
    default_isa()); parallel: over torch's intra-op threads (None: PARALLEL, see there). Needs kernel_available()."""
    seg = _segment_tensor(segments)
    if seg.numel():
        load_kernel().packed_lowrank_delta(x, rows, seg, table.table, table.n_blocks, table.max_rank, _level(isa),
                                           PARALLEL if parallel is None else parallel, y, cols)


def add_dense_deltas(x: torch.Tensor, y: torch.Tensor, rows: torch.Tensor, segments: torch.Tensor, table: PackedTable,
                     isa: str | None = None) -> None:
    """add_packed_deltas for segments of many rows (a prefill): each segment's tenant's factors dequantised once (as
    dequantized_factors) into a thread's scratch, then two float32 GEMMs; the tenants split over torch's threads,
    the sum rounded once into y as add_packed_deltas rounds. segments int64 [S, 3] of (first index into rows,
    count, slot). Needs kernel_available()."""
    if segments.numel():
        load_kernel().packed_dense_delta(x, rows, segments, table.table, table.n_blocks, _level(isa), y)


def add_packed_rows(positions: torch.Tensor, y: torch.Tensor, rows: torch.Tensor,
                    segments: list[tuple[int, int, int]] | torch.Tensor, table: PackedTable,
                    isa: str | None = None) -> None:
    """y[rows[i]] += ΔŴ[positions[i]] in place (rounded once to y's dtype, as add_packed_deltas), ΔŴ [h_out, h_in]
    the delta in `table` of the slot of i's segment: a tenant's embedding rows from its compressed vocabulary delta,
    read from the packed codes (k codes of Û, then V̂'s k·h_in). positions, rows int64 [n]; y [N, h_in] contiguous;
    segments, isa as add_packed_deltas'. On the calling thread (k·h_in codes a row)."""
    seg = _segment_tensor(segments)
    if seg.numel():
        load_kernel().packed_rows(positions, rows, seg, table.table, table.n_blocks, table.max_rank, table.h_out,
                                  _level(isa), y)


def packed_delta(x: torch.Tensor, table: PackedTable, slot: int = 0, isa: str | None = None,
                 parallel: bool | None = None) -> torch.Tensor:
    """x·ΔŴᵀ float32 [n, h_out] for every row of x [n, h_in] (any float dtype) with the delta of `slot`."""
    x = x.contiguous()
    out = torch.zeros(x.shape[0], table.h_out, dtype=torch.float32, device=x.device)
    add_packed_deltas(x, out, torch.arange(x.shape[0]), [(0, x.shape[0], slot)], table, isa, parallel)
    return out


def dequantized_factors(table: PackedTable, slot: int, h_in: int,
                        isa: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The slot's delta as float32 factors (a [K, h_in], b [K, h_out]) with x·ΔŴᵀ = (x aᵀ) b: a's row j = σ_j sv_j (Cv_j − zv_j),
    b's row j = su_j (Cu_j − zu_j). For segments of many rows (a prefill), two GEMMs on these beat the fused call,
    which decodes every code once per 4 rows (DeltaLinear's DENSE_MIN_ROWS). Needs kernel_available()."""
    a, b = torch.empty(table.ranks[slot], h_in), torch.empty(table.ranks[slot], table.h_out)
    load_kernel().packed_dequantize(table.table, table.n_blocks, slot, _level(isa), a, b)
    return a, b
