"""The byte layout of a CompressedLinear blob (compressed_linear.py's docstring): field sizes and a walk over
its headers, in plain Python (no torch), so that `prinmix info` reads a delta without importing torch.

    kind u8 (0 = rank blocks, 1 = sign) | n_blocks u8 | per block: bits u8, k u32, flags u8, v_group u32,
    u_group u32, then V, U, σ — whose sizes follow from the header (block_nbytes)

`blob_blocks` checks what can be checked without decoding: the kind, every width and rank, the group
sizes and that the fields fill the blob exactly. Decoding the codes and checking that the float16 fields are
finite is CompressedLinear.from_blob's job (load_delta).
"""

from __future__ import annotations

import math
import struct

__all__ = ["BLOB_HEADER_BYTES", "BLOCK_HEADER_BYTES", "SIGN_HEADER_BYTES", "FLOAT_BITS", "BLOCK_HEADER_FORMAT",
           "check_code_width", "packed_nbytes", "quantized_nbytes", "block_nbytes", "sign_blob_nbytes",
           "blob_blocks"]

BLOB_HEADER_BYTES = 2          # kind, n_blocks
BLOCK_HEADER_FORMAT = "<BIBII"  # bits, k, flags, v_group, u_group
BLOCK_HEADER_BYTES = struct.calcsize(BLOCK_HEADER_FORMAT)  # 14
SIGN_HEADER_BYTES = 1 + 2      # kind, scale
FLOAT_BITS = 16                # width tag of raw float16 factors
FLAG_SIGMA, FLAG_U_TRANSPOSED = 1, 2


def check_code_width(bits: int) -> None:
    """Raise ValueError unless BITS is an int in 1..8 (a packable code width)."""
    if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 8:
        raise ValueError(f"bit width must be an int in 1..8, got {bits!r}")


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes needed for `numel` codes of `bits` bits: ceil(numel * bits / 8)."""
    check_code_width(bits)
    if numel < 0:
        raise ValueError(f"numel must be >= 0, got {numel}")
    return (numel * bits + 7) // 8


def quantized_nbytes(rows: int, cols: int, bits: int, group_size: int) -> int:
    """Stored bytes of a rows×cols matrix: packed codes + f16 scale + u8 zero per (row, column group);
    2·rows·cols for raw float16 factors (bits == FLOAT_BITS)."""
    if bits == FLOAT_BITS:
        return 2 * rows * cols
    groups = rows * math.ceil(cols / group_size) if cols else 0
    return packed_nbytes(rows * cols, bits) + 3 * groups


def block_nbytes(bits: int, k: int, h_out: int, h_in: int, v_group: int, u_group: int,
                 u_transposed: bool, sigma: bool) -> int:
    """Exact stored bytes of one RankBlock (header + V + U + σ)."""
    n = BLOCK_HEADER_BYTES + quantized_nbytes(k, h_in, bits, v_group or 1)
    u_shape = (k, h_out) if u_transposed else (h_out, k)
    n += quantized_nbytes(*u_shape, bits, u_group or 1)
    return n + (2 * k if sigma else 0)


def sign_blob_nbytes(h_out: int, h_in: int) -> int:
    """Exact bytes of a BitDelta (sign) blob of an h_out×h_in delta."""
    return SIGN_HEADER_BYTES + packed_nbytes(h_out * h_in, 1)


def blob_blocks(data: bytes, shape: tuple[int, int]) -> list[tuple[int, int]]:
    """(bits, k) of every rank block of the blob DATA of an h_out×h_in delta, in stored order; [] for a
    BitDelta (sign) blob. Raises ValueError when the headers are inconsistent or the sizes they imply do
    not add up to len(DATA) exactly (truncated or trailing bytes)."""
    h_out, h_in = shape
    if len(data) < 1:
        raise ValueError("blob is empty")
    kind = data[0]
    if kind == 1:
        if len(data) != sign_blob_nbytes(h_out, h_in):
            raise ValueError(f"sign blob has {len(data)} bytes, {sign_blob_nbytes(h_out, h_in)} expected")
        return []
    if kind != 0:
        raise ValueError(f"unknown blob kind {kind}")
    if len(data) < BLOB_HEADER_BYTES:
        raise ValueError("blob truncated: no block count")
    pos, blocks = BLOB_HEADER_BYTES, []
    for _ in range(data[1]):
        if pos + BLOCK_HEADER_BYTES > len(data):
            raise ValueError(f"blob truncated: needs {pos + BLOCK_HEADER_BYTES} bytes, has {len(data)}")
        bits, k, flags, v_group, u_group = struct.unpack_from(BLOCK_HEADER_FORMAT, data, pos)
        if not (1 <= bits <= 8 or bits == FLOAT_BITS):
            raise ValueError(f"invalid width {bits}")
        if k > min(h_out, h_in):
            raise ValueError(f"rank {k} exceeds min{tuple(shape)}")
        if bits != FLOAT_BITS and (v_group < 1 or u_group < 1):
            raise ValueError(f"invalid group size {min(v_group, u_group)}")
        pos += block_nbytes(bits, k, h_out, h_in, v_group, u_group, bool(flags & FLAG_U_TRANSPOSED),
                            bool(flags & FLAG_SIGMA))
        blocks.append((bits, k))
    if pos != len(data):
        raise ValueError(f"blob truncated: needs {pos} bytes, has {len(data)}" if pos > len(data)
                         else f"blob has {len(data) - pos} trailing bytes")
    return blocks
