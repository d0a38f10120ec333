"""The packed, device-resident form of one tenant's compressed linear delta.

What is resident is what the delta file stores, minus the blob headers: per rank block the
*packed* code stream of V̂ [k, h_in] and of the stored Û ([h_out, k], or [k, h_out] when
transposed) — uint8 bytes in the layout of `prinmix.algorithms.packing` (row-major, LSB first) —
their float16 scales and uint8 zero points per (row, column group), and σ (float16 [k]) when
stored; raw float16 factors for 16-bit blocks. BitDelta keeps its packed sign bits and scale.
Nothing is expanded to float factors or a dense ΔW here: the runtime dequantises on the fly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

from ..algorithms.compressed_linear import FLOAT_BITS, CompressedLinear, QuantizedMatrix
from ..algorithms.packing import pack_codes


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


_TABLES: dict = {}


def _byte_table(bits: int, device) -> torch.Tensor:
    """uint8 [256, 8 // bits]: the codes held by each byte value (1, 2, 4 bits: codes never straddle bytes)."""
    key = (bits, str(device))
    if key not in _TABLES:
        per = 8 // bits
        values = torch.arange(256, dtype=torch.int32)[:, None] >> (torch.arange(per, dtype=torch.int32) * bits)
        _TABLES[key] = (values & ((1 << bits) - 1)).to(torch.uint8).to(device)
    return _TABLES[key]


def unpack_fast(data: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Same result as packing.unpack_codes (uint8 [numel]), in few tensor ops (the hot path of the torch
    runtime). 1/2/4 bits: one table lookup per byte; 3 bits: each 3-byte word read as an int32; 5/6/7
    bits: each `bits`-byte word read as an int64. Measured on 2 CPU threads, 230k codes, against int64
    words for every width: 1-bit 187 → 92 µs, 2-bit ~380 → ~120 µs, 3-bit 448 → 192 µs."""
    if bits == 8:
        return data[:numel]
    if 8 % bits == 0:
        per = 8 // bits
        n_bytes = -(-numel // per)
        return torch.index_select(_byte_table(bits, data.device), 0, data[:n_bytes].int()).reshape(-1)[:numel]
    n_words = -(-numel // 8)
    need = n_words * bits
    raw = data[:need]
    if raw.numel() < need:
        raw = torch.cat([raw, raw.new_zeros(need - raw.numel())])
    mask = (1 << bits) - 1
    if bits == 3:
        raw = raw.view(n_words, 3)
        word = raw[:, 0].int() | (raw[:, 1].int() << 8) | (raw[:, 2].int() << 16)
        return ((word[:, None] >> _shifts(3, 8, torch.int32, data.device)) & mask).to(torch.uint8).reshape(-1)[:numel]
    words = (raw.view(n_words, bits).to(torch.int64) << _shifts(8, bits, torch.int64, data.device)).sum(1)
    codes = (words[:, None] >> _shifts(bits, 8, torch.int64, data.device)) & mask
    return codes.reshape(-1)[:numel].to(torch.uint8)


def _shifts(step: int, count: int, dtype: torch.dtype, device) -> torch.Tensor:
    """[0, step, 2·step, …] (count values) in dtype on device, cached: the hot path builds none."""
    key = ("shifts", step, count, dtype, str(device))
    if key not in _TABLES:
        _TABLES[key] = torch.arange(count, dtype=dtype, device=device) * step
    return _TABLES[key]


@dataclass
class PackedMatrix:
    """One stored factor [rows, cols].

    bits 1..8: `data` uint8 [ceil(rows*cols*bits/8)] packed codes, `scale` float16 [rows, n_groups],
    `zero` uint8 [rows, n_groups], value[r, c] = scale[r, c//group] * (code[r, c] - zero[r, c//group]).
    bits 16: `data` float16 [rows, cols], no scale/zero.
    """

    rows: int
    cols: int
    bits: int
    group: int
    data: torch.Tensor
    scale: torch.Tensor | None = None
    zero: torch.Tensor | None = None
    # float32 copies of per-row scale / zero (8 B a row, negligible next to the codes), made on first use so
    # the hot path does not convert them at every step; not copied by replace()/to()
    _params_f32: tuple | None = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def from_stored(cls, m: QuantizedMatrix | torch.Tensor, bits: int) -> "PackedMatrix":
        if bits == FLOAT_BITS:
            rows, cols = m.shape
            return cls(rows, cols, bits, 0, m.to(torch.float16).contiguous())
        rows, cols = m.shape
        return cls(rows, cols, bits, m.group_size, pack_codes(m.codes.reshape(-1), bits),
                   m.scale.to(torch.float16).contiguous(), m.zero.to(torch.uint8).contiguous())

    @property
    def n_groups(self) -> int:
        return math.ceil(self.cols / self.group) if self.group and self.cols else 0

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.data, self.scale, self.zero) if t is not None]

    def nbytes(self) -> int:
        return sum(_nbytes(t) for t in self.tensors())

    def to(self, device) -> "PackedMatrix":
        return replace(self, data=self.data.to(device), scale=None if self.scale is None else self.scale.to(device),
                       zero=None if self.zero is None else self.zero.to(device))

    def row_params(self) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 (scale [rows, 1], zero [rows, 1]) of a per-row-quantised matrix (n_groups == 1), cached."""
        if self._params_f32 is None:
            self._params_f32 = (self.scale.to(torch.float32), self.zero.to(torch.float32))
        return self._params_f32

    def codes_f32(self) -> torch.Tensor:
        """The unpacked codes [rows, cols] as float32 (a transient)."""
        return unpack_fast(self.data, self.bits, self.rows * self.cols).view(self.rows, self.cols).to(torch.float32)

    def fused_rows(self) -> bool:
        """Whether matmul_t / matmul may skip dequantisation: codes with one (scale, zero) per row."""
        return self.bits != FLOAT_BITS and self.n_groups == 1 and self.rows * self.cols > 0

    def matmul_t(self, x: torch.Tensor) -> torch.Tensor:
        """x [n, cols] @ valueᵀ → [n, rows] float32 without dequantising: with value = s_r·(C − z_r),
        x·valueᵀ = s_r·(x·Cᵀ − z_r·Σx). Needs fused_rows()."""
        scale, zero = self.row_params()
        return (x @ self.codes_f32().T - x.sum(-1, keepdim=True) * zero.T) * scale.T

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [n, rows] @ value → [n, cols] float32 without dequantising: Σ_r x_r·s_r·(C_r − z_r) =
        (x·s)·C − (x·s)·z. Needs fused_rows()."""
        scale, zero = self.row_params()
        xs = x * scale.T
        return xs @ self.codes_f32() - xs @ zero

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        """[rows, cols] in `dtype` (a transient of the torch reference path)."""
        if self.bits == FLOAT_BITS:
            return self.data.to(dtype)
        if self.rows * self.cols == 0:
            return torch.zeros(self.rows, self.cols, dtype=dtype, device=self.data.device)
        codes = self.codes_f32()
        if self.n_groups == 1:  # one pair per row, cached: 8 B/row against rows·cols·bits/8 B of codes
            scale, zero = self.row_params()
            return (scale * (codes - zero)).to(dtype)
        scale, zero = self.scale.to(torch.float32), self.zero.to(torch.float32)
        if self.cols % self.group == 0:
            g = codes.view(self.rows, self.n_groups, self.group)
            return (scale[..., None] * (g - zero[..., None])).view(self.rows, self.cols).to(dtype)
        idx = torch.arange(self.cols, device=codes.device) // self.group
        return (scale[:, idx] * (codes - zero[:, idx])).to(dtype)


@dataclass
class PackedBlock:
    """k ranks of one width: ΔW_b = U_b diag(σ_b) V_b."""

    bits: int
    v: PackedMatrix                   # [k, h_in]
    u: PackedMatrix                   # [h_out, k], or [k, h_out] when u_transposed
    u_transposed: bool
    sigma: torch.Tensor | None        # float16 [k]

    @property
    def rank(self) -> int:
        return self.v.rows

    def nbytes(self) -> int:
        return self.v.nbytes() + self.u.nbytes() + _nbytes(self.sigma)

    def to(self, device) -> "PackedBlock":
        return replace(self, v=self.v.to(device), u=self.u.to(device),
                       sigma=None if self.sigma is None else self.sigma.to(device))

    def per_row_codes(self) -> bool:
        """Both factors are codes with one (scale, zero) per stored row and Û is stored transposed [k, h_out]
        (PrinMix's layout): then C − z are the factors' integers, and each rank's rows are contiguous codes."""
        return self.v.fused_rows() and self.u.fused_rows() and self.u_transposed

    def v_matrix(self, dtype=torch.float32) -> torch.Tensor:
        """V̂_b [k, h_in]."""
        return self.v.dequantize(dtype)

    def u_matrix(self, dtype=torch.float32) -> torch.Tensor:
        """Û_b [h_out, k] (σ not folded in)."""
        u = self.u.dequantize(dtype)
        return u.T if self.u_transposed else u


@dataclass
class PackedSign:
    """BitDelta: ΔŴ = scale · (2·bit − 1); `bits` uint8 [ceil(h_out*h_in/8)] packed row-major, 1 = positive."""

    bits: torch.Tensor
    scale: torch.Tensor               # float16 scalar

    def nbytes(self) -> int:
        return _nbytes(self.bits) + _nbytes(self.scale)

    def to(self, device) -> "PackedSign":
        return PackedSign(self.bits.to(device), self.scale.to(device))

    def signs(self, row_start: int, row_end: int, h_in: int, dtype=torch.float32) -> torch.Tensor:
        """±1 [row_end − row_start, h_in] for output rows [row_start, row_end); row_start*h_in % 8 == 0."""
        first, n = row_start * h_in, (row_end - row_start) * h_in
        assert first % 8 == 0
        bits = unpack_fast(self.bits[first // 8:], 1, n).view(row_end - row_start, h_in)
        return bits.to(dtype) * 2 - 1


@dataclass
class PackedLinear:
    """One tenant's delta of one linear layer [h_out, h_in]: rank blocks or a sign matrix."""

    shape: tuple[int, int]
    blocks: list[PackedBlock] = field(default_factory=list)
    sign: PackedSign | None = None

    @classmethod
    def from_compressed(cls, m: CompressedLinear) -> "PackedLinear":
        """Re-pack the codes of a parsed delta matrix into the byte stream its blob stores."""
        if m.sign is not None:
            packed = pack_codes(m.sign.positive.to(torch.uint8).reshape(-1), 1)
            return cls(tuple(m.shape), sign=PackedSign(packed, m.sign.scale.to(torch.float16).reshape(())))
        blocks = [PackedBlock(b.bits, PackedMatrix.from_stored(b.v, b.bits), PackedMatrix.from_stored(b.u, b.bits),
                              b.u_transposed, None if b.sigma is None else b.sigma.to(torch.float16).contiguous())
                  for b in m.blocks if b.rank > 0]
        return cls(tuple(m.shape), blocks=blocks)

    @property
    def rank(self) -> int:
        return sum(b.rank for b in self.blocks)

    @property
    def resident_bytes(self) -> int:
        """Bytes this delta keeps on the device: the blob minus its headers."""
        return self.sign.nbytes() if self.sign is not None else sum(b.nbytes() for b in self.blocks)

    def to(self, device) -> "PackedLinear":
        return PackedLinear(self.shape, [b.to(device) for b in self.blocks],
                            None if self.sign is None else self.sign.to(device))

    def reconstruct(self, dtype=torch.float32) -> torch.Tensor:
        """Dense ΔŴ [h_out, h_in] — for tests only; the runtime never builds it."""
        h_out, h_in = self.shape
        if self.sign is not None:
            return (self.sign.signs(0, h_out, h_in) * self.sign.scale.float()).to(dtype)
        out = torch.zeros(h_out, h_in)
        for b in self.blocks:
            u = b.u_matrix()
            if b.sigma is not None:
                u = u * b.sigma.float()[None, :]
            out += u @ b.v_matrix()
        return out.to(dtype)


# ---- N tenants of one layer in flat buffers (the Triton path's operands) ------------------------

# Columns of StackedPacks.meta, one row per (slot, block); offsets are element offsets into the
# buffer named in the comment (V_DATA/U_DATA point into `raw` instead of `codes` for 16-bit blocks).
BITS, K, RANK_OFF, V_DATA, V_SCALE, V_ZERO, V_GROUP, V_NGROUPS, U_DATA, U_SCALE, U_ZERO, U_GROUP, \
    U_NGROUPS, U_T, SIGMA = range(15)
META_FIELDS = 16


@dataclass
class StackedPacks:
    """Every resident tenant's packed delta of one layer, concatenated by kind and indexed by slot.

    codes uint8 (packed codes and sign bits), scales float16, zeros uint8, raw float16 (16-bit factors
    and σ); meta int64 [n_slots, max_blocks, META_FIELDS]; n_blocks int32 [n_slots]; sign_off int64
    [n_slots] (byte offset of the sign bits in `codes`, −1 = none); sign_scale float32 [n_slots].
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    raw: torch.Tensor
    meta: torch.Tensor
    n_blocks: torch.Tensor
    sign_off: torch.Tensor
    sign_scale: torch.Tensor
    max_blocks: int
    max_block_rank: int
    max_rank: int
    has_sign: bool

    def nbytes(self) -> int:
        return sum(_nbytes(t) for t in (self.codes, self.scales, self.zeros, self.raw))


class _Buffer:
    """Collects tensors of one dtype; `offset(t)` is where t will start in the concatenation."""

    def __init__(self, dtype):
        self.dtype, self.parts, self.size = dtype, [], 0

    def add(self, t: torch.Tensor) -> int:
        off = self.size
        self.parts.append(t.reshape(-1))
        self.size += t.numel()
        return off

    def concat(self, device) -> torch.Tensor:
        if not self.parts:
            return torch.zeros(1, dtype=self.dtype, device=device)   # kernels need a valid pointer
        return torch.cat([p.to(device) for p in self.parts])


def stack_tenants(tenants: dict[int, PackedLinear], device) -> StackedPacks:
    """Concatenate the tenants' buffers and re-point every tenant's tensors at views of them, so the
    stacked copy is the only copy (tenants' PackedLinear objects are modified in place)."""
    codes, scales, zeros, raw = (_Buffer(torch.uint8), _Buffer(torch.float16), _Buffer(torch.uint8),
                                 _Buffer(torch.float16))
    n_slots = max(tenants, default=-1) + 1
    max_blocks = max((len(p.blocks) for p in tenants.values()), default=0)
    meta = torch.zeros(max(n_slots, 1), max(max_blocks, 1), META_FIELDS, dtype=torch.int64)
    n_blocks = torch.zeros(max(n_slots, 1), dtype=torch.int32)
    sign_off = torch.full((max(n_slots, 1),), -1, dtype=torch.int64)
    sign_scale = torch.zeros(max(n_slots, 1), dtype=torch.float32)
    rebind = []   # (object, attribute, buffer, offset, shape)

    def put(owner, attr, t, buf):
        off = buf.add(t)
        rebind.append((owner, attr, buf, off, tuple(t.shape)))
        return off

    for slot, p in tenants.items():
        if p.sign is not None:
            sign_off[slot] = put(p.sign, "bits", p.sign.bits, codes)
            sign_scale[slot] = float(p.sign.scale)
            continue
        n_blocks[slot] = len(p.blocks)
        rank_off = 0
        for j, b in enumerate(p.blocks):
            row = meta[slot, j]
            row[BITS], row[K], row[RANK_OFF], row[U_T] = b.bits, b.rank, rank_off, int(b.u_transposed)
            for m, (f_data, f_scale, f_zero, f_group, f_ng) in (
                    (b.v, (V_DATA, V_SCALE, V_ZERO, V_GROUP, V_NGROUPS)),
                    (b.u, (U_DATA, U_SCALE, U_ZERO, U_GROUP, U_NGROUPS))):
                if m.bits == FLOAT_BITS:
                    row[f_data] = put(m, "data", m.data, raw)
                    row[f_group], row[f_ng] = 1, 0
                else:
                    row[f_data] = put(m, "data", m.data, codes)
                    row[f_scale] = put(m, "scale", m.scale, scales)
                    row[f_zero] = put(m, "zero", m.zero, zeros)
                    row[f_group], row[f_ng] = m.group, m.n_groups
            row[SIGMA] = -1 if b.sigma is None else put(b, "sigma", b.sigma, raw)
            rank_off += b.rank
    flat = {id(buf): buf.concat(device) for buf in (codes, scales, zeros, raw)}
    for owner, attr, buf, off, shape in rebind:
        n = math.prod(shape)
        setattr(owner, attr, flat[id(buf)][off:off + n].view(shape))
    ranks = [p.rank for p in tenants.values()]
    block_ranks = [b.rank for p in tenants.values() for b in p.blocks]
    return StackedPacks(flat[id(codes)], flat[id(scales)], flat[id(zeros)], flat[id(raw)], meta.to(device),
                        n_blocks.to(device), sign_off.to(device), sign_scale.to(device), max_blocks,
                        max(block_ranks, default=0), max(ranks, default=0),
                        any(p.sign is not None for p in tenants.values()))
