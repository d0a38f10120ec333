"""Bit packing of quantisation codes (widths 1..8) into a byte stream.

Layout: codes are flattened row-major; code i occupies stream bits [i*bits, (i+1)*bits), least
significant bit first, and stream bit k is bit (k % 8) of byte k // 8 ("little-endian" bit order).
Eight codes always fill exactly `bits` bytes, so both directions work on groups of 8 codes held
in one int64 word (at most 7*8 = 56 bits used). Pure tensor code; works on any device. The size formula
(packed_nbytes) lives in blob_layout.py, with the rest of the blob's sizes, torch-free.
"""

from __future__ import annotations

import torch

from .blob_layout import check_code_width, packed_nbytes


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes (any shape, values in [0, 2**bits)) into uint8 [packed_nbytes(numel, bits)]."""
    check_code_width(bits)
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise TypeError(f"codes must be an integer tensor (uint8), got {codes.dtype}")
    flat = codes.reshape(-1)
    numel = flat.numel()
    if numel and (int(flat.min()) < 0 or int(flat.max()) >= 1 << bits):
        raise ValueError(f"codes must lie in [0, {1 << bits}) for {bits}-bit packing, "
                         f"got range [{int(flat.min())}, {int(flat.max())}]")
    if bits == 8:
        return flat.to(torch.uint8, copy=True)
    n_words = (numel + 7) // 8
    padded = torch.zeros(n_words * 8, dtype=torch.uint8, device=flat.device)
    padded[:numel] = flat
    eight = padded.view(n_words, 8)
    word = torch.zeros(n_words, dtype=torch.int64, device=flat.device)
    for i in range(8):                       # code i of each word -> bits [i*bits, (i+1)*bits)
        word |= eight[:, i].long() << (i * bits)
    out = torch.empty(n_words, bits, dtype=torch.uint8, device=flat.device)
    for b in range(bits):                    # byte b of each word
        out[:, b] = (word >> (8 * b)) & 0xFF
    out = out.reshape(-1)
    nbytes = packed_nbytes(numel, bits)
    return out if out.numel() == nbytes else out[:nbytes].clone()   # own storage, exact length


def unpack_codes(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of pack_codes: uint8 packed bytes -> uint8 [numel] codes.

    Raises ValueError if `packed` holds fewer than packed_nbytes(numel, bits) bytes; bytes
    beyond that length are ignored.
    """
    nbytes = packed_nbytes(numel, bits)
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed must be uint8, got {packed.dtype}")
    flat = packed.reshape(-1)
    if flat.numel() < nbytes:
        raise ValueError(f"packed buffer too short: {numel} codes of {bits} bits need {nbytes} bytes, "
                         f"got {flat.numel()}")
    if bits == 8:
        return flat[:numel].clone()
    n_words = (numel + 7) // 8
    padded = torch.zeros(n_words * bits, dtype=torch.uint8, device=flat.device)
    padded[:nbytes] = flat[:nbytes]
    word_bytes = padded.view(n_words, bits)
    word = torch.zeros(n_words, dtype=torch.int64, device=flat.device)
    for b in range(bits):
        word |= word_bytes[:, b].long() << (8 * b)
    mask = (1 << bits) - 1
    out = torch.empty(n_words, 8, dtype=torch.uint8, device=flat.device)
    for i in range(8):
        out[:, i] = (word >> (i * bits)) & mask
    out = out.reshape(-1)
    return out if out.numel() == numel else out[:numel].clone()
