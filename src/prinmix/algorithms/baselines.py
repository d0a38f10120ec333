"""Baselines through the same interface and at the same true bytes as PrinMix.

Each returns a CompressedLinear whose blob fits floor(α·16·h_out·h_in) bits (BitDelta excepted:
its size is fixed, see its docstring).
"""

from __future__ import annotations

import math

import torch

from ..errors import BudgetError
from .budget import budget_bits
from .compressed_linear import (
    BLOB_HEADER_BYTES,
    FLOAT_BITS,
    CompressedLinear,
    QuantizedMatrix,
    RankBlock,
    SignDelta,
    block_nbytes,
)
from .gptq import GPTQLayout, gptq_quantize
from .lowrank_svd import FactoredDelta, thin_svd

DELTACOME_GROUP = 128


def compress_lowrank(W: torch.Tensor, H: torch.Tensor, ratio: float, cfg=None) -> CompressedLinear:
    """Truncated SVD (Ryu et al. 2023): the largest rank k whose float16 factors
    B = U_k Σ_k^½ [h_out, k] and A = Σ_k^½ V_k [k, h_in] fit the budget. H is not used.

    Σ is split evenly between the factors (decision): with Σ in B alone, one delta entry of 1e5 gives
    σ₁ ≈ 1e5 > 65504 and an Inf in B; balanced, |entries| ≤ √σ₁, finite up to σ₁ ≈ 4·10⁹, and small
    deltas keep their factors out of float16's subnormal range too. Larger σ₁ leave an Inf, which
    compress refuses (DeltaRangeError)."""
    h_out, h_in = W.shape
    total = budget_bits(ratio, h_out, h_in) // 8
    per_rank = 2 * (h_out + h_in)
    k = max(0, (total - BLOB_HEADER_BYTES - block_nbytes(FLOAT_BITS, 0, h_out, h_in, 0, 0, False, False))
            // per_rank)
    k = min(k, min(h_out, h_in))
    blocks = []
    if k:
        U, S, Vh = thin_svd(W)
        k = min(k, S.numel())  # a factored delta has no more ranks than its factors
        root = S[:k].sqrt()
        blocks.append(RankBlock(FLOAT_BITS, (root[:, None] * Vh[:k]).half(), (U[:, :k] * root).half()))
    return CompressedLinear((h_out, h_in), "lowrank", blocks, info={"rank_index": list(range(k))})


def compress_bitdelta(W: torch.Tensor, H: torch.Tensor, ratio: float, cfg=None) -> CompressedLinear:
    """BitDelta (Liu et al. 2024) without scale distillation: ΔŴ = s · sign(ΔW), s = mean|ΔW|
    (the L2-optimal scale for a sign matrix). H is not used; the model pipeline can distil s.

    Its size is fixed: 1 bit per entry + one float16 scale + a 3-byte header, i.e. just over 1/16.
    Requested ratios ≥ 1/16 are met up to those 5 bytes; a smaller ratio is refused (BudgetError).
    The mean is taken in float64 (a float32 sum of 3e38 entries overflows); a mean beyond float16's
    65504 leaves an Inf scale, which compress refuses (DeltaRangeError).
    """
    h_out, h_in = W.shape
    if budget_bits(ratio, h_out, h_in) < h_out * h_in:
        raise BudgetError(f"BitDelta stores 1 bit per delta entry (ratio 1/16); ratio {ratio:g} is below it")
    if isinstance(W, FactoredDelta):  # signs need every entry
        W = W.dense()
    scale = W.abs().double().mean().half()
    return CompressedLinear((h_out, h_in), "bitdelta", sign=SignDelta(W >= 0, scale))


def _truncate_plan(plan: list[tuple[int, int]], k: int) -> list[tuple[int, int]]:
    """The first k ranks of a [(bits, count), ...] plan."""
    out = []
    for bits, n in plan:
        take = min(n, k - sum(c for _, c in out))
        if take > 0:
            out.append((bits, take))
    return out


def deltacome_rank_plan(budget_bytes: int, h_out: int, h_in: int) -> list[tuple[int, int]]:
    """[(bits, k), ...] in singular-value order: 2 ranks at 8 bits, 32 at 3 bits, then 2-bit ranks
    while the whole blob fits `budget_bytes`. If even the first ranks do not fit, the 3-bit then
    the 8-bit counts shrink until they do (the rule later papers apply at other ratios)."""
    r = min(h_out, h_in)

    def size(plan):
        return BLOB_HEADER_BYTES + sum(
            block_nbytes(b, k, h_out, h_in, DELTACOME_GROUP, DELTACOME_GROUP, False, True) for b, k in plan if k)

    n8, n3 = min(2, r), min(32, max(0, r - 2))
    while n3 and size([(8, n8), (3, n3)]) > budget_bytes:
        n3 -= 1
    while n8 and size([(8, n8), (3, n3)]) > budget_bytes:
        n8 -= 1
    # Largest n2 that fits: size is monotone in n2, so bisect.
    lo, hi = 0, r - n8 - n3
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if size([(8, n8), (3, n3), (2, mid)]) <= budget_bytes:
            lo = mid
        else:
            hi = mid - 1
    return [(b, k) for b, k in ((8, n8), (3, n3), (2, lo)) if k]


def compress_deltacome(W: torch.Tensor, H: torch.Tensor, ratio: float, cfg=None) -> CompressedLinear:
    """Delta-CoMe (Ping et al. 2024) as we run it — the public release cannot run (its GPTQ file is
    missing), so this is the working reference. Exactly:

    1. ΔW = U Σ V (SVD); ranks taken in singular-value order with the plan of `deltacome_rank_plan`
       (2 @ 8 bits, 32 @ 3 bits, then 2-bit ranks until the true byte budget is spent).
    2. V_k [k, h_in] quantised by GPTQ with H = XXᵀ, per-row width, asymmetric min–max scales per
       group of 128 input columns (float16 scale + uint8 zero per group).
    3. U_k [h_out, k] (unit columns, Σ kept apart in float16) quantised by GPTQ with the Hessian of
       its input Σ V̂ X, i.e. H_U = Σ V̂ H V̂ᵀ Σ, column widths following the ranks, per-row scales per
       group of 128 rank columns (groups never straddle two widths).
    4. No RTC, no clipping search; GPTQ damping 1 % of mean diag(H), block size 128.
    Stored: V̂ and Û codes, all group scales/zeros and Σ, all counted in the budget.
    """
    h_out, h_in = W.shape
    percdamp = getattr(cfg, "percdamp", 0.01)
    plan = deltacome_rank_plan(budget_bits(ratio, h_out, h_in) // 8, h_out, h_in)
    k = sum(n for _, n in plan)
    if k == 0:
        return CompressedLinear((h_out, h_in), "deltacome", [], info={"rank_index": []})
    U, S, Vh = thin_svd(W)
    if S.numel() < k:  # a factored delta of rank < k: the plan stops at its last rank
        plan = _truncate_plan(plan, S.numel())
        k = S.numel()
    U, S, Vh = U[:, :k], S[:k], Vh[:k]
    # σ is stored in float16: a σ beyond its range (one delta entry of 1e5) is moved into V's row, which
    # GPTQ quantises with its own per-group scales (row scaling commutes with it), so σ' = σ/c stays
    # ≤ 2^15 and σ'·V' = σ·V. Unchanged for every σ ≤ 2^15.
    c = (S / 2 ** 15).clamp_min(1.0)
    S, Vh = S / c, Vh * c[:, None]
    bits = torch.cat([torch.full((n,), b, dtype=torch.long) for b, n in plan]).to(W.device)
    vq = gptq_quantize(Vh, H, bits, layout=GPTQLayout.ROWS, group_size=DELTACOME_GROUP,
                       percdamp=percdamp)
    v_hat = vq.dequant
    sv = S[:, None] * v_hat
    H_u = sv @ H @ sv.T
    groups, start = [], 0
    for _, n in plan:
        groups += [(s, min(s + DELTACOME_GROUP, start + n)) for s in range(start, start + n, DELTACOME_GROUP)]
        start += n
    uq = gptq_quantize(U, H_u, bits, layout=GPTQLayout.COLUMN_BITS, groups=groups, percdamp=percdamp)
    blocks, start, g0 = [], 0, 0
    for b, n in plan:
        sl = slice(start, start + n)
        ng = math.ceil(n / DELTACOME_GROUP)
        v = QuantizedMatrix(vq.codes[sl], vq.scale[sl].half(), vq.zero[sl].to(torch.uint8), b, DELTACOME_GROUP)
        u = QuantizedMatrix(uq.codes[:, sl].contiguous(), uq.scale[:, g0:g0 + ng].half().contiguous(),
                            uq.zero[:, g0:g0 + ng].to(torch.uint8).contiguous(), b, DELTACOME_GROUP)
        blocks.append(RankBlock(b, v, u, sigma=S[sl].half()))
        start, g0 = start + n, g0 + ng
    return CompressedLinear((h_out, h_in), "deltacome", blocks, info={"rank_index": list(range(k))})
