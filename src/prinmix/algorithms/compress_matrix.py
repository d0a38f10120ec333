"""PrinMix on one matrix (paper Algorithm 1), and the entry point for every method.

compress_matrix(ΔW, H, ratio, method) → CompressedLinear whose stored blob fits
floor(ratio · 16 · h_out · h_in) bits, everything counted (see budget.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import BudgetError
from . import baselines
from .allocation import allocate_bits
from .budget import budget_bits, prinmix_fixed_overhead_bits, prinmix_rank_cost_bits
from .compressed_linear import BLOB_HEADER_BYTES, CompressedLinear, QuantizedMatrix, RankBlock
from .gptq import GPTQLayout, gptq_quantize
from .lowrank_svd import FactoredDelta, thin_svd
from .methods import METHOD_NAMES, METHODS
from .prinmix_config import PrinMixConfig
from .quantize import FP16_MAX_SCALE
from .rtc import correct_reconstruction_target, correct_reconstruction_target_rows
from .width_simulation import simulate_width_errors


def _prepare(delta, H: torch.Tensor | None):
    """(ΔW float32 — a tensor, or a FactoredDelta kept factored —, H float32 on its device), validated."""
    if delta.ndim != 2:
        raise ValueError(f"delta must be 2-D, got shape {tuple(delta.shape)}")
    W = delta.to(torch.float32)
    if not (W.is_finite() if isinstance(W, FactoredDelta) else torch.isfinite(W).all()):
        raise ValueError("delta holds NaN or Inf")
    h_in = W.shape[1]
    if H is None:  # data-free: plain Frobenius error
        H = torch.eye(h_in, dtype=torch.float32, device=W.device)
    if tuple(H.shape) != (h_in, h_in):
        raise ValueError(f"H must be [{h_in}, {h_in}], got {tuple(H.shape)}")
    H = H.to(device=W.device, dtype=torch.float32)
    if not torch.isfinite(H).all():
        raise ValueError("Hessian holds NaN or Inf")
    return W, H


def _balance_ranks(v_hat: torch.Tensor, v_scale: torch.Tensor, u_target: torch.Tensor):
    """Move excess magnitude of Û's columns into V̂'s rows, by powers of two: (V̂ [k, h_in], its scales
    [k, groups], U target [h_out, k]) → (2^e V̂, 2^e scales, U 2^-e) with e ≥ 0 per rank, the smallest
    keeping every |U| column ≤ 2^14.

    Û is stored with one float16 scale per rank: a column spanning more than 65504·(2^b − 1) (σ of a
    1e7 delta entry) would saturate and give a silently wrong ΔŴ. V̂'s codes are kept, its scales
    multiplied by 2^e (exact in float16 while they stay ≤ 65504; beyond that the stored scale is Inf,
    which compress refuses), so V̂ and the product U V̂ are unchanged. e = 0 — nothing changes — for
    every delta whose σ stays below ~2^14."""
    span = u_target.abs().amax(dim=0)
    e = torch.ceil(torch.log2(span / 2 ** 14)).clamp_min(0)
    if not bool((e > 0).any()):
        return v_hat, v_scale, u_target
    c = torch.exp2(e)
    return v_hat * c[:, None], v_scale * c[:, None], u_target / c


@dataclass
class PrinMixAnalysis:
    """What PrinMix computes of one matrix before its budget is known (SVD, Eq. 5 width errors): one
    analysis serves any number of budgets (`prinmix_at_budget`), e.g. the whole-budget split's probes."""

    W: torch.Tensor                 # ΔW [h_out, h_in] float32 (or a FactoredDelta)
    H: torch.Tensor                 # XXᵀ [h_in, h_in] float32
    S: torch.Tensor                 # σ [r]
    U: torch.Tensor                 # [h_out, r]
    E: torch.Tensor                 # Eq. 5 errors [r, widths]
    sim: object                     # width_simulation's quantised V rows at every nonzero width
    nonzero: list                   # the nonzero widths, sim's row blocks
    widths: tuple
    config: PrinMixConfig
    row_weights: torch.Tensor | None
    H_u_extra: torch.Tensor | None  # c̄·I of the row-weighted objective, added to H for Û's GPTQ


def analyse_prinmix(delta, H: torch.Tensor | None, config: PrinMixConfig | None = None,
                    row_weights: torch.Tensor | None = None) -> PrinMixAnalysis:
    """The budget-independent half of PrinMix (compress_prinmix): SVD and the width simulation (Eq. 5)."""
    cfg = config or PrinMixConfig()
    cfg.validate()
    W, H = _prepare(delta, H)
    h_out, h_in = W.shape
    widths = tuple(sorted(cfg.widths))
    U, S, Vh = thin_svd(W)
    rank_iso = H_v = H_u_extra = None
    if row_weights is not None:
        c = row_weights.to(device=W.device, dtype=torch.float32)
        if c.shape != (h_out,) or not torch.isfinite(c).all() or (c < 0).any():
            raise ValueError(f"row_weights must be finite, ≥ 0 and of shape [{h_out}]")
        rank_iso = (c[:, None] * U * U).sum(0)                       # ρᵢ = Σ_t c_t U_ti²
        s2 = S.double() ** 2
        rho_bar = float((s2 * rank_iso.double()).sum() / s2.sum().clamp_min(1e-300)) if S.numel() else 0.0
        eye = torch.eye(h_in, dtype=torch.float32, device=W.device)
        H_v = H + rho_bar * eye
        H_u_extra = float(c.mean()) * eye
        row_weights = row_weights.to(W.device)
    E, sim, nonzero = simulate_width_errors(S, Vh, H, widths, cfg, rank_iso=rank_iso, H_quant=H_v)
    return PrinMixAnalysis(W, H, S, U, E, sim, nonzero, widths, cfg, row_weights, H_u_extra)


def compress_prinmix(delta, H: torch.Tensor | None, ratio: float, config: PrinMixConfig | None = None,
                     row_weights: torch.Tensor | None = None, budget: int | None = None) -> CompressedLinear:
    """PrinMix (Algorithm 1): SVD → width simulation on V → exact allocation (Eq. 8) → V̂ by GPTQ →
    RTC (Eq. 7) → Û by column-wise GPTQ at the same widths. Σ is folded into U's per-column scales.

    delta ΔW [h_out, h_in] (a tensor, or a FactoredDelta: its SVD then comes from the factors);
    H = XXᵀ [h_in, h_in] (None = identity); ratio α of the 16-bit delta; budget: the blob's bits
    (overrides ratio; the vocabulary parts of a whole delta get theirs from the shared budget).

    row_weights c [h_out] ≥ 0 (vocabulary matrices, see vocab_delta.py): the objective becomes
    Σ_t r_t (H + c_t I) r_tᵀ for the residual rows r_t of ΔW − ΔŴ (output row t's error is also paid
    c_t times in plain squared norm: an embedding row looked up c_t times). It stays exact where
    PrinMix's derivation allows: Eq. 5's per-rank error becomes σᵢ² ΔVᵢ (H + ρᵢ I) ΔVᵢᵀ with
    ρᵢ = Σ_t c_t U_ti² (exact, U orthonormal), and RTC solves each row's own system (rtc.py). The two
    GPTQ runs need one Hessian for all rows: V uses H + ρ̄ I (ρ̄ the σ²-weighted mean of ρᵢ), U uses
    V̂ (H + c̄ I) V̂ᵀ (c̄ the mean row weight) — approximations of the quantiser only, not of the
    errors the allocation sees.
    """
    h_out, h_in = delta.shape
    total = budget_bits(ratio, h_out, h_in) if budget is None else int(budget)
    _check_budget(total, ratio, h_out, h_in)
    return prinmix_at_budget(analyse_prinmix(delta, H, config, row_weights), total)


def _check_budget(total: int, ratio: float, h_out: int, h_in: int) -> None:
    if total < 8 * BLOB_HEADER_BYTES:
        raise BudgetError(f"ratio {ratio:g} leaves {total} bits for a {h_out}x{h_in} matrix; "
                          f"its header alone needs {8 * BLOB_HEADER_BYTES}")


def prinmix_at_budget(a: PrinMixAnalysis, total: int) -> CompressedLinear:
    """The budget-dependent half of PrinMix: the exact allocation (Eq. 8) of `total` blob bits, V̂ rows
    from the width simulation, RTC (Eq. 7) and Û by GPTQ (compress_prinmix)."""
    cfg, W, H, S, widths = a.config, a.W, a.H, a.S, a.widths
    h_out, h_in = W.shape
    _check_budget(total, total / (16 * h_out * h_in), h_out, h_in)
    n_blocks = min(cfg.fmax, sum(b > 0 for b in widths))
    budget = total - prinmix_fixed_overhead_bits(n_blocks)
    costs = np.array([prinmix_rank_cost_bits(b, h_out, h_in, cfg.v_group) for b in widths], dtype=np.int64)
    alloc = allocate_bits(a.E.numpy(), costs, max(budget, 0), cfg.fmax)
    rank_bits = np.asarray(widths)[alloc.choice]

    # Kept ranks, ordered so equal widths are contiguous (widest first, then singular-value order).
    kept = [i for i in np.lexsort((np.arange(len(rank_bits)), -rank_bits)) if rank_bits[i] > 0]
    kept_t = torch.tensor(kept, dtype=torch.long, device=W.device)
    bits_k = torch.tensor([int(rank_bits[i]) for i in kept], dtype=torch.long, device=W.device)
    r = S.numel()
    if kept:
        sim_rows = torch.tensor([a.nonzero.index(int(rank_bits[i])) * r + i for i in kept], device=W.device)
        v_hat, v_codes, v_scale, v_zero = a.sim.rows(sim_rows)
    else:
        v_hat = torch.zeros(0, h_in, device=W.device)

    if cfg.rtc and a.row_weights is not None:
        u_target = correct_reconstruction_target_rows(W, H, v_hat, a.row_weights, cfg.rtc_damp)
    elif cfg.rtc:
        u_target = correct_reconstruction_target(W, H, v_hat, cfg.rtc_damp)
    else:
        u_target = a.U[:, kept_t] * S[kept_t]
    blocks: list[RankBlock] = []
    if kept:
        v_hat, v_scale, u_target = _balance_ranks(v_hat, v_scale, u_target)
        H_u = v_hat @ (H if a.H_u_extra is None else H + a.H_u_extra) @ v_hat.T
        uq = gptq_quantize(u_target, H_u, bits_k, layout=GPTQLayout.COLUMNS,
                           blocksize=cfg.blocksize, percdamp=cfg.percdamp, clip_search=cfg.clip_search)
        if bool((uq.scale >= FP16_MAX_SCALE).any()):
            raise ValueError("a rank of Û spans more than float16 scales can hold (it would saturate)")
        start = 0
        for b in sorted(set(bits_k.tolist()), reverse=True):
            end = start + int((bits_k == b).sum())
            sl = slice(start, end)
            v = QuantizedMatrix(v_codes[sl], v_scale[sl].half(), v_zero[sl].to(torch.uint8), b,
                                cfg.v_group or h_in)
            u = QuantizedMatrix(uq.codes[:, sl].T.contiguous(), uq.scale[sl].half()[:, None],
                                uq.zero[sl].to(torch.uint8)[:, None], b, h_out)
            blocks.append(RankBlock(b, v, u, u_transposed=True))
            start = end

    out = CompressedLinear((h_out, h_in), "prinmix", blocks)
    out.info = {"objective": alloc.objective, "certified": alloc.certified, "rank_index": kept,
                "sigma": S.cpu(), "errors": a.E, "widths": widths, "budget_bits": total}
    assert 8 * out.nbytes() <= total, f"internal: {8 * out.nbytes()} bits > budget {total}"
    return out


def compress_matrix(delta, H: torch.Tensor | None, ratio: float, method: str = "prinmix",
                    config: PrinMixConfig | None = None, row_weights: torch.Tensor | None = None) -> CompressedLinear:
    """Compress ΔW [h_out, h_in] with `method` (a name of methods.METHODS) at ratio α.

    delta: a dense tensor, or a FactoredDelta (LoRA: ΔW = s·B·A), which the SVD-based methods never
    expand (BitDelta, which needs every entry's sign, expands it).
    row_weights c [h_out] (vocabulary matrices): PrinMix minimises Σ_t r_t (H + c_t I) r_tᵀ (see
    compress_prinmix); Delta-CoMe, which has one Hessian per matrix by design, quantises with
    H + mean(c)·I; low-rank and BitDelta use no Hessian and ignore it."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: choose one of {', '.join(METHOD_NAMES)}")
    if method == "prinmix":
        return compress_prinmix(delta, H, ratio, config, row_weights=row_weights)
    fn = {"deltacome": baselines.compress_deltacome, "lowrank": baselines.compress_lowrank,
          "bitdelta": baselines.compress_bitdelta}[method]
    W, H = _prepare(delta, H)
    if row_weights is not None and method == "deltacome":
        H = H + float(row_weights.float().mean()) * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    return fn(W, H, ratio, config or PrinMixConfig())
