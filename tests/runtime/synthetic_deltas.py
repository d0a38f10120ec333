"""Synthetic compressed deltas for the runtime tests: every block layout the format allows
(widths 1–8 and 16, scale groups that split rows unevenly, U stored plain and transposed, with and
without σ) and one delta per compression method."""

import torch

from prinmix.algorithms.compress_matrix import compress_matrix
from prinmix.algorithms.compressed import CompressedLinear, QuantizedMatrix, RankBlock

H_OUT, H_IN = 48, 40


def _qm(rows, cols, bits, group, g):
    codes = torch.randint(0, 2 ** bits, (rows, cols), generator=g, dtype=torch.uint8)
    ng = -(-cols // group)
    scale = (torch.rand(rows, ng, generator=g) * 0.02).half()
    zero = torch.randint(0, 2 ** bits, (rows, ng), generator=g, dtype=torch.uint8)
    return QuantizedMatrix(codes, scale, zero, bits, group)


def mixed_blocks(h_out=H_OUT, h_in=H_IN, seed=0) -> CompressedLinear:
    """Odd widths, partial scale groups, U stored plain and transposed, with and without σ, a 16-bit block."""
    g = torch.Generator().manual_seed(seed)
    blocks = [
        RankBlock(3, _qm(4, h_in, 3, 16, g), _qm(h_out, 4, 3, 3, g), sigma=(torch.rand(4, generator=g) + .5).half()),
        RankBlock(5, _qm(3, h_in, 5, h_in, g), _qm(3, h_out, 5, 20, g), u_transposed=True),
        RankBlock(16, (torch.randn(2, h_in, generator=g) * .05).half(), (torch.randn(h_out, 2, generator=g) * .05).half()),
        RankBlock(8, _qm(2, h_in, 8, 7, g), _qm(2, h_out, 8, h_out, g), u_transposed=True,
                  sigma=torch.rand(2, generator=g).half()),
        RankBlock(1, _qm(2, h_in, 1, 40, g), _qm(h_out, 2, 1, 2, g)),
    ]
    return CompressedLinear((h_out, h_in), "mixed", blocks)


def method_deltas(h_out=H_OUT, h_in=H_IN, seed=0) -> dict[str, CompressedLinear]:
    """One compressed delta per kind: hand-built mixed blocks, PrinMix, Delta-CoMe, low-rank, BitDelta."""
    g = torch.Generator().manual_seed(seed + 100)
    out = {"mixed": mixed_blocks(h_out, h_in, seed)}
    for i, method in enumerate(("prinmix", "deltacome", "lowrank", "bitdelta")):
        u = torch.randn(h_out, 6, generator=g)
        v = torch.randn(6, h_in, generator=g)
        delta = (u @ v + 0.1 * torch.randn(h_out, h_in, generator=g)) * 0.01
        out[method] = compress_matrix(delta, None, 0.25, method)
    return out


def all_widths(h_out: int, h_in: int, seed: int = 0) -> CompressedLinear:
    """Widths 2–8 within one matrix (PrinMix's candidate set), one block each of rank 1–3, alternating
    per-row and grouped scales and plain / transposed U, σ on every other block."""
    g = torch.Generator().manual_seed(seed + 7)
    blocks = []
    for i, bits in enumerate(range(2, 9)):
        k = 1 + i % 3
        v_group = h_in if i % 2 == 0 else 5
        if i % 2 == 0:
            u = _qm(k, h_out, bits, h_out, g)
        else:
            u = _qm(h_out, k, bits, 2, g)
        sigma = (torch.rand(k, generator=g) + .5).half() if i % 2 else None
        blocks.append(RankBlock(bits, _qm(k, h_in, bits, v_group, g), u, u_transposed=i % 2 == 0, sigma=sigma))
    return CompressedLinear((h_out, h_in), "mixed", blocks)
