"""The compressed form of one linear layer's delta, and its exact stored size.

Every method stores a matrix delta ΔW [h_out, h_in] as ONE self-describing byte blob
(a uint8 tensor in the delta file), so that its size on disk is exactly what is counted
against the budget: codes, scales, zero points, per-rank widths, Σ and the blob's own
header all live inside it.

Blob layout (little endian):
    kind u8                     0 = rank blocks (PrinMix, Delta-CoMe, low-rank), 1 = sign (BitDelta)
    kind 0:  n_blocks u8, then per block:
        bits u8                 1..8 quantised, 16 = raw float16 factors
        k u32                   ranks in the block
        flags u8                bit0: sigma stored, bit1: U stored transposed ([k, h_out])
        v_group u32, u_group u32   columns per scale group of V [k, h_in] and of stored U
        V:  codes (packed, k*h_in values) | scale f16 [k, ceil(h_in/v_group)] | zero u8 [same]
        U:  same for the stored U ([h_out, k], or [k, h_out] when transposed)
        sigma f16 [k]           when flagged
       (bits == 16: V and U are raw float16 arrays, no scale/zero)
    kind 1:  scale f16, then packed sign bits of h_out*h_in entries (1 = positive)

ΔŴ = Σ_blocks U_b · diag(σ_b) · V_b (σ_b = 1 when not stored).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field

import torch

from .blob_layout import (  # noqa: F401  (header sizes re-exported: the blob layout's constants)
    BLOB_HEADER_BYTES,
    BLOCK_HEADER_BYTES,
    BLOCK_HEADER_FORMAT,
    FLAG_SIGMA,
    FLAG_U_TRANSPOSED,
    FLOAT_BITS,
    SIGN_HEADER_BYTES,
    block_nbytes,
    packed_nbytes,
    quantized_nbytes,
    sign_blob_nbytes,
)
from .packing import pack_codes, unpack_codes


@dataclass
class QuantizedMatrix:
    """Codes of a [rows, cols] matrix at `bits` with one asymmetric (scale, zero) per (row, column group).

    value[r, c] = scale[r, g] * (code[r, c] - zero[r, g]),  g = c // group_size.
    """

    codes: torch.Tensor      # uint8 [rows, cols]
    scale: torch.Tensor      # float16 [rows, n_groups]
    zero: torch.Tensor       # uint8 [rows, n_groups]
    bits: int
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        rows, cols = self.shape
        if rows * cols == 0:
            return torch.zeros(rows, cols, dtype=dtype, device=self.codes.device)
        idx = torch.arange(cols, device=self.codes.device) // self.group_size
        scale = self.scale.to(torch.float32)[:, idx]
        zero = self.zero.to(torch.float32)[:, idx]
        return (scale * (self.codes.to(torch.float32) - zero)).to(dtype)

    @staticmethod
    def nbytes_for(rows: int, cols: int, bits: int, group_size: int) -> int:
        """Stored bytes of a rows×cols matrix: packed codes + f16 scale + u8 zero per group."""
        return quantized_nbytes(rows, cols, bits, group_size)


def _n_groups(cols: int, group_size: int) -> int:
    return math.ceil(cols / group_size) if cols else 0


@dataclass
class RankBlock:
    """k ranks sharing one width: ΔW_b = U_b diag(σ_b) V_b, U_b [h_out, k], V_b [k, h_in]."""

    bits: int
    v: QuantizedMatrix | torch.Tensor            # [k, h_in]; float16 tensor when bits == 16
    u: QuantizedMatrix | torch.Tensor            # [h_out, k], or [k, h_out] if u_transposed
    u_transposed: bool = False
    sigma: torch.Tensor | None = None            # float16 [k]

    @property
    def rank(self) -> int:
        return int(self.v.shape[0])

    def v_matrix(self, dtype=torch.float32) -> torch.Tensor:
        """V̂_b [k, h_in]."""
        return self.v.dequantize(dtype) if isinstance(self.v, QuantizedMatrix) else self.v.to(dtype)

    def u_matrix(self, dtype=torch.float32) -> torch.Tensor:
        """Û_b diag(σ_b) [h_out, k] (σ folded in)."""
        u = self.u.dequantize(dtype) if isinstance(self.u, QuantizedMatrix) else self.u.to(dtype)
        if self.u_transposed:
            u = u.T
        if self.sigma is not None:
            u = u * self.sigma.to(dtype)[None, :]
        return u


@dataclass
class SignDelta:
    """BitDelta: ΔŴ = scale · sign(ΔW)."""

    positive: torch.Tensor    # bool [h_out, h_in]
    scale: torch.Tensor       # float16 scalar

    def reconstruct(self, dtype=torch.float32) -> torch.Tensor:
        s = self.scale.to(dtype)
        return torch.where(self.positive, s, -s)


@dataclass
class CompressedLinear:
    """A compressed delta of one linear layer: rank blocks (SVD methods) or a sign matrix (BitDelta).

    `info` carries diagnostics that are not stored (e.g. the allocation's objective,
    the original rank index of each kept rank); they never enter the file.
    """

    shape: tuple[int, int]                       # (h_out, h_in)
    method: str
    blocks: list[RankBlock] = field(default_factory=list)
    sign: SignDelta | None = None
    info: dict = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return sum(b.rank for b in self.blocks)

    def rank_widths(self) -> list[int]:
        """Width (bits) of every kept rank in stored order (16 = float16)."""
        return [b.bits for b in self.blocks for _ in range(b.rank)]

    def factors(self, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """(B [h_out, k], A [k, h_in]) with ΔŴ = B A and Σ folded into B (LoRA's lora_B, lora_A)."""
        if self.sign is not None:
            raise ValueError("a BitDelta (sign) delta has no low-rank factors")
        h_out, h_in = self.shape
        if not self.blocks:
            return torch.zeros(h_out, 0, dtype=dtype), torch.zeros(0, h_in, dtype=dtype)
        return (torch.cat([b.u_matrix(dtype) for b in self.blocks], 1),
                torch.cat([b.v_matrix(dtype) for b in self.blocks], 0))

    def nonfinite_field(self) -> str | None:
        """Which stored float16 field holds NaN/Inf ('block 0 scales of V', …), or None when all are finite.

        Every float a blob stores is float16 (scales, σ, raw factors, BitDelta's scale); finite fields
        give a finite ΔŴ in float32 (|entries| ≤ 65504² · 255² · rank)."""
        if self.sign is not None:
            return None if bool(torch.isfinite(self.sign.scale).all()) else "the sign scale"
        for i, b in enumerate(self.blocks):
            fields = {"V": b.v.scale if isinstance(b.v, QuantizedMatrix) else b.v,
                      "U": b.u.scale if isinstance(b.u, QuantizedMatrix) else b.u}
            if b.sigma is not None:
                fields["sigma"] = b.sigma
            for what, t in fields.items():
                if t.numel() and not bool(torch.isfinite(t).all()):
                    return f"block {i} ({b.bits}-bit) {what}"
        return None

    def reconstruct(self, dtype=torch.float32) -> torch.Tensor:
        """ΔŴ [h_out, h_in]."""
        if self.sign is not None:
            return self.sign.reconstruct(dtype)
        b, a = self.factors(torch.float32)
        return (b @ a).to(dtype)

    def nbytes(self) -> int:
        """Exact size of the stored blob in bytes (== to_blob().numel())."""
        h_out, h_in = self.shape
        if self.sign is not None:
            return sign_blob_nbytes(h_out, h_in)
        return BLOB_HEADER_BYTES + sum(
            block_nbytes(b.bits, b.rank, h_out, h_in, _group(b.v), _group(b.u), b.u_transposed,
                         b.sigma is not None)
            for b in self.blocks)

    def stored_copy(self, keep_info=("objective", "certified", "rank_index")) -> "CompressedLinear":
        """What the file will hold: parsed back from the blob (on CPU, without device tensors or
        diagnostics that must not reach the file), with the `info` entries named in keep_info."""
        back = CompressedLinear.from_blob(self.to_blob(), self.shape, self.method)
        back.info = {k: v for k, v in self.info.items() if k in keep_info}
        return back

    # ---- serialisation -------------------------------------------------------------------
    def to_blob(self) -> torch.Tensor:
        """The uint8 blob stored in the delta file (layout in the module docstring)."""
        parts: list[bytes] = []
        if self.sign is not None:
            parts.append(struct.pack("<B", 1))
            parts.append(self.sign.scale.to(torch.float16).reshape(1).numpy().tobytes())
            parts.append(pack_codes(self.sign.positive.to(torch.uint8).reshape(-1), 1).numpy().tobytes())
        else:
            if len(self.blocks) > 255:
                raise ValueError("at most 255 rank blocks per matrix")
            parts.append(struct.pack("<BB", 0, len(self.blocks)))
            for b in self.blocks:
                flags = (FLAG_SIGMA if b.sigma is not None else 0) | (FLAG_U_TRANSPOSED if b.u_transposed else 0)
                parts.append(struct.pack(BLOCK_HEADER_FORMAT, b.bits, b.rank, flags, _group(b.v), _group(b.u)))
                for m in (b.v, b.u):
                    parts.append(_matrix_bytes(m, b.bits))
                if b.sigma is not None:
                    parts.append(b.sigma.to(torch.float16).contiguous().numpy().tobytes())
        blob = b"".join(parts)
        return torch.frombuffer(bytearray(blob), dtype=torch.uint8)

    @classmethod
    def from_blob(cls, blob: torch.Tensor, shape: tuple[int, int], method: str) -> "CompressedLinear":
        """Parse a blob written by `to_blob`. Raises ValueError on any inconsistency (truncation etc.)."""
        h_out, h_in = shape
        data = blob.contiguous().numpy().tobytes() if isinstance(blob, torch.Tensor) else bytes(blob)
        reader = _ByteReader(data)
        kind = reader.unpack("<B")[0]
        if kind == 1:
            scale = reader.tensor(torch.float16, 1).reshape(())
            n = h_out * h_in
            bits_ = unpack_codes(reader.raw(packed_nbytes(n, 1)), 1, n)
            reader.finish()
            if not bool(torch.isfinite(scale)):
                raise ValueError("the sign scale holds NaN/Inf")
            return cls(shape, method, sign=SignDelta(bits_.reshape(h_out, h_in).bool(), scale))
        if kind != 0:
            raise ValueError(f"unknown blob kind {kind}")
        n_blocks = reader.unpack("<B")[0]
        blocks = []
        for _ in range(n_blocks):
            bits, k, flags, v_group, u_group = reader.unpack(BLOCK_HEADER_FORMAT)
            if not (1 <= bits <= 8 or bits == FLOAT_BITS):
                raise ValueError(f"invalid width {bits}")
            if k > min(h_out, h_in):
                raise ValueError(f"rank {k} exceeds min{shape}")
            u_t = bool(flags & FLAG_U_TRANSPOSED)
            v = reader.matrix(k, h_in, bits, v_group)
            u = reader.matrix(k, h_out, bits, u_group) if u_t else reader.matrix(h_out, k, bits, u_group)
            sigma = reader.tensor(torch.float16, k) if flags & FLAG_SIGMA else None
            blocks.append(RankBlock(bits, v, u, u_t, sigma))
        reader.finish()
        out = cls(shape, method, blocks=blocks)
        bad = out.nonfinite_field()
        if bad is not None:
            raise ValueError(f"{bad} holds NaN/Inf")
        return out


def _group(m) -> int:
    return m.group_size if isinstance(m, QuantizedMatrix) else 0


def _matrix_bytes(m, bits: int) -> bytes:
    if bits == FLOAT_BITS:
        return m.to(torch.float16).contiguous().numpy().tobytes()
    assert isinstance(m, QuantizedMatrix) and m.bits == bits
    return (pack_codes(m.codes.reshape(-1), bits).numpy().tobytes()
            + m.scale.to(torch.float16).contiguous().numpy().tobytes()
            + m.zero.to(torch.uint8).contiguous().numpy().tobytes())


class _ByteReader:
    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def raw(self, n: int) -> torch.Tensor:
        if self.pos + n > len(self.data):
            raise ValueError(f"blob truncated: needs {self.pos + n} bytes, has {len(self.data)}")
        out = torch.frombuffer(bytearray(self.data[self.pos:self.pos + n]), dtype=torch.uint8) if n else \
            torch.zeros(0, dtype=torch.uint8)
        self.pos += n
        return out

    def unpack(self, fmt: str):
        n = struct.calcsize(fmt)
        return struct.unpack(fmt, self.raw(n).numpy().tobytes())

    def tensor(self, dtype: torch.dtype, numel: int) -> torch.Tensor:
        size = torch.empty(0, dtype=dtype).element_size()
        return self.raw(size * numel).view(dtype)

    def matrix(self, rows: int, cols: int, bits: int, group: int):
        if bits == FLOAT_BITS:
            return self.tensor(torch.float16, rows * cols).reshape(rows, cols)
        if group < 1:
            raise ValueError(f"invalid group size {group}")
        codes = unpack_codes(self.raw(packed_nbytes(rows * cols, bits)), bits, rows * cols)
        if codes.numel() and int(codes.max()) >= 2 ** bits:
            raise ValueError("code out of range")
        g = _n_groups(cols, group)
        scale = self.tensor(torch.float16, rows * g).reshape(rows, g)
        zero = self.raw(rows * g).reshape(rows, g)
        return QuantizedMatrix(codes.reshape(rows, cols), scale, zero, bits, group)

    def finish(self) -> None:
        if self.pos != len(self.data):
            raise ValueError(f"blob has {len(self.data) - self.pos} trailing bytes")
