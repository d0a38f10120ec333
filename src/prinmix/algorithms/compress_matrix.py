"""PrinMix on one matrix (paper Algorithm 1), and the entry point for every method.

compress_matrix(ΔW, H, ratio, method) → CompressedLinear whose stored blob fits
floor(ratio · 16 · h_out · h_in) bits, everything counted (see budget.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import BudgetError
from .allocation import allocate_bits
from .budget import budget_bits, prinmix_fixed_overhead_bits, prinmix_rank_cost_bits
from .compressed import BLOB_HEADER_BYTES, CompressedLinear, QuantizedMatrix, RankBlock
from .gptq import gptq_quantize, prepare_hessian
from .lowrank_svd import FactoredDelta, thin_svd
from .quantize import FP16_MAX_SCALE, dequantize_codes
from .rtc import correct_reconstruction_target, correct_reconstruction_target_rows

DEFAULT_WIDTHS = (0, 2, 3, 4, 5, 6, 7, 8)
METHODS = ("prinmix", "deltacome", "bitdelta", "lowrank")  # every method a delta file may name


@dataclass
class PrinMixConfig:
    """Knobs of PrinMix. Defaults follow the paper (widths {0,2..8}, f_max = 4, RTC on)."""

    widths: tuple[int, ...] = DEFAULT_WIDTHS   # candidate widths Q (0 = rank dropped)
    fmax: int = 4                              # at most this many distinct widths (0 counts, as in Eq. 8)
    v_group: int | None = None                 # V scale group (input columns); None = one per row
    rtc: bool = True                           # Reconstruction Target Correction (Eq. 7)
    rtc_damp: float = 1e-4
    percdamp: float = 0.01                     # GPTQ damping, fraction of mean diag(H)
    clip_search: bool = False                  # min–max range shrink search in the quantiser
    blocksize: int = 128                       # GPTQ lazy-batch block

    def validate(self) -> None:
        if not self.widths or any(not (0 <= b <= 8) for b in self.widths):
            raise ValueError(f"candidate widths must lie in 0..8, got {self.widths}")
        if len(set(self.widths)) != len(self.widths):
            raise ValueError(f"candidate widths repeat: {self.widths}")
        if self.fmax < 1:
            raise ValueError(f"fmax must be ≥ 1, got {self.fmax}")


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


SIM_CHUNK_BYTES = 1 << 30  # float32 rows of stacked V per GPTQ call in the width simulation


@dataclass
class WidthSimulation:
    """GPTQ of V at every non-zero candidate width: codes uint8 [nb·r, h_in] (width k's rows at k·r..),
    scale/zero [nb·r, n_groups], column groups; dequantised rows are rebuilt on demand (rows())."""
    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    group_bounds: list[tuple[int, int]]

    def rows(self, index: torch.Tensor):
        """(dequant float32, codes, scale, zero) of the given stacked rows; dequant is bit-identical to
        GPTQ's own (dequantize_codes of the same codes and params)."""
        codes, scale, zero = self.codes[index], self.scale[index], self.zero[index]
        sizes = torch.tensor([e - s for s, e in self.group_bounds], device=codes.device)
        dequant = dequantize_codes(codes, scale.repeat_interleave(sizes, dim=1), zero.repeat_interleave(sizes, dim=1))
        return dequant, codes, scale, zero


def simulate_width_errors(S: torch.Tensor, Vh: torch.Tensor, H: torch.Tensor, widths, cfg: PrinMixConfig,
                          chunk_bytes: int | None = None, rank_iso: torch.Tensor | None = None,
                          H_quant: torch.Tensor | None = None):
    """E[i, j] = σᵢ² · ΔVᵢ H ΔVᵢᵀ for every rank i and candidate width j (Eq. 5), ΔV = V − GPTQ_b(V).

    rank_iso [r] (row-weighted objective, see compress_prinmix): E[i, j] += σᵢ² ρᵢ ‖ΔVᵢ‖², ρᵢ = Σ_t c_t U_ti².
    H_quant: the Hessian GPTQ quantises V with (default H).

    GPTQ quantises V stacked once per non-zero width (rows are independent under a shared H, so this
    equals one run per width), in as few calls as fit `chunk_bytes` of float32 rows each, all sharing
    one factorisation of H; only codes and scales are kept (a 70B down_proj: 7 × 8192 × 28672 rows
    would be 6.6 GB of float32 per copy). chunk_bytes None: the module's SIM_CHUNK_BYTES.
    Returns (E float64 [r, nb], WidthSimulation, nonzero widths).
    """
    chunk_bytes = SIM_CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    r, h_in = Vh.shape
    nonzero = [b for b in widths if b > 0]
    column = {b: j for j, b in enumerate(widths)}
    E = torch.zeros(r, len(widths), dtype=torch.float64)
    sigma2 = S.double() ** 2

    iso = None if rank_iso is None else rank_iso.to(device=Vh.device, dtype=torch.float64)
    H_quant = H if H_quant is None else H_quant

    def weighted(dV: torch.Tensor) -> torch.Tensor:  # σᵢ² · ΔVᵢ (H + ρᵢ I) ΔVᵢᵀ per rank
        quad = ((dV @ H) * dV).sum(1).double()
        if iso is not None:
            quad = quad + iso * (dV * dV).sum(1).double()
        return (sigma2.to(quad.device) * quad).cpu()

    if 0 in column:  # a dropped rank's error is all of it: ΔV = V
        E[:, column[0]] = weighted(Vh)
    sim = None
    if nonzero and r:
        prepared = prepare_hessian(H_quant, cfg.percdamp)
        per_call = max(1, chunk_bytes // max(1, 4 * r * h_in))
        parts = []
        for c in range(0, len(nonzero), per_call):
            chunk = nonzero[c:c + per_call]
            row_bits = torch.tensor(chunk, device=Vh.device).repeat_interleave(r)
            res = gptq_quantize(Vh.repeat(len(chunk), 1), H_quant, row_bits, bits_axis="row", scale_axis="row",
                                group_size=cfg.v_group, blocksize=cfg.blocksize, percdamp=cfg.percdamp,
                                clip_search=cfg.clip_search, prepared=prepared)
            for k, b in enumerate(chunk):
                E[:, column[b]] = weighted(Vh - res.dequant[k * r:(k + 1) * r])
            parts.append((res.codes, res.scale, res.zero))
            bounds = res.group_bounds
            del res
        sim = WidthSimulation(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
                              torch.cat([p[2] for p in parts]), bounds)
    return E.clamp_min(0.0), sim, nonzero


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
    cfg = config or PrinMixConfig()
    cfg.validate()
    W, H = _prepare(delta, H)
    h_out, h_in = W.shape
    widths = tuple(sorted(cfg.widths))
    total = budget_bits(ratio, h_out, h_in) if budget is None else int(budget)
    if total < 8 * BLOB_HEADER_BYTES:
        raise BudgetError(f"ratio {ratio:g} leaves {total} bits for a {h_out}x{h_in} matrix; "
                          f"its header alone needs {8 * BLOB_HEADER_BYTES}")
    n_blocks = min(cfg.fmax, sum(b > 0 for b in widths))
    budget = total - prinmix_fixed_overhead_bits(n_blocks)

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
    E, sim, nonzero = simulate_width_errors(S, Vh, H, widths, cfg, rank_iso=rank_iso, H_quant=H_v)
    costs = np.array([prinmix_rank_cost_bits(b, h_out, h_in, cfg.v_group) for b in widths], dtype=np.int64)
    alloc = allocate_bits(E.numpy(), costs, max(budget, 0), cfg.fmax)
    rank_bits = np.asarray(widths)[alloc.choice]

    # Kept ranks, ordered so equal widths are contiguous (widest first, then singular-value order).
    kept = [i for i in np.lexsort((np.arange(len(rank_bits)), -rank_bits)) if rank_bits[i] > 0]
    kept_t = torch.tensor(kept, dtype=torch.long, device=W.device)
    bits_k = torch.tensor([int(rank_bits[i]) for i in kept], dtype=torch.long, device=W.device)
    r = S.numel()
    if kept:
        sim_rows = torch.tensor([nonzero.index(int(rank_bits[i])) * r + i for i in kept], device=W.device)
        v_hat, v_codes, v_scale, v_zero = sim.rows(sim_rows)
    else:
        v_hat = torch.zeros(0, h_in, device=W.device)

    if cfg.rtc and row_weights is not None:
        u_target = correct_reconstruction_target_rows(W, H, v_hat, row_weights.to(W.device), cfg.rtc_damp)
    elif cfg.rtc:
        u_target = correct_reconstruction_target(W, H, v_hat, cfg.rtc_damp)
    else:
        u_target = U[:, kept_t] * S[kept_t]
    blocks: list[RankBlock] = []
    if kept:
        v_hat, v_scale, u_target = _balance_ranks(v_hat, v_scale, u_target)
        H_u = v_hat @ (H if H_u_extra is None else H + H_u_extra) @ v_hat.T
        uq = gptq_quantize(u_target, H_u, bits_k, bits_axis="col", scale_axis="col",
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
                "sigma": S.cpu(), "errors": E, "widths": widths, "budget_bits": total}
    assert 8 * out.nbytes() <= total, f"internal: {8 * out.nbytes()} bits > budget {total}"
    return out


def compress_matrix(delta, H: torch.Tensor | None, ratio: float, method: str = "prinmix",
                    config: PrinMixConfig | None = None, row_weights: torch.Tensor | None = None) -> CompressedLinear:
    """Compress ΔW [h_out, h_in] with `method` ∈ {prinmix, deltacome, lowrank, bitdelta} at ratio α.

    delta: a dense tensor, or a FactoredDelta (LoRA: ΔW = s·B·A), which the SVD-based methods never
    expand (BitDelta, which needs every entry's sign, expands it).
    row_weights c [h_out] (vocabulary matrices): PrinMix minimises Σ_t r_t (H + c_t I) r_tᵀ (see
    compress_prinmix); Delta-CoMe, which has one Hessian per matrix by design, quantises with
    H + mean(c)·I; low-rank and BitDelta use no Hessian and ignore it."""
    from . import baselines

    if method == "prinmix":
        return compress_prinmix(delta, H, ratio, config, row_weights=row_weights)
    fn = {"deltacome": baselines.compress_deltacome, "lowrank": baselines.compress_lowrank,
          "bitdelta": baselines.compress_bitdelta}.get(method)
    if fn is None:
        raise ValueError(f"unknown method {method!r}: choose prinmix, deltacome, lowrank or bitdelta")
    W, H = _prepare(delta, H)
    if row_weights is not None and method == "deltacome":
        H = H + float(row_weights.float().mean()) * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    return fn(W, H, ratio, config or PrinMixConfig())
