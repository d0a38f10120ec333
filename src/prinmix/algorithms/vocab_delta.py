"""Compressed deltas of vocabulary matrices (input embedding, lm_head): the changed rows, their objective,
and how the budget of a whole delta is shared between parts by one exchange rate.

A vocabulary matrix E [V, d] plays up to two roles:
    lookup   x = E[t] for each input token t            (the input embedding)
    head     logits = E h for each final normed state h (lm_head; the same matrix when tied)
Only the rows R that differ from the base are compressed: ΔE_R [n, d] (rows added to the vocabulary
are stored exactly beside it). For a residual r_t = ΔE_t − ΔÊ_t the squared error over N calibration
positions is, per role,
    lookup   Σ_t c_t ‖r_t‖²           c_t = times token t is an input (every occurrence pays it)
    head     Σ_h ‖R h‖² = Σ_t r_t H r_tᵀ,   H = Σ hhᵀ over the same N positions [d, d]
so a tied matrix, which plays both, has  J(R) = Σ_t r_t (H + c_t I) r_tᵀ  — PrinMix's objective with a
per-row Hessian (compress_matrix(..., row_weights=c)); an untied embedding has H = 0, an untied lm_head
c = 0. Decision: both roles are summed with weight 1, i.e. the error per calibration position of the
input vector and of the logit vector count alike; the head's H is taken on the reconstructed model's
final normed states (what the served model feeds it), as for every other linear.

Lookup weights have a floor (lookup_weights): the served text is not the calibration text, so the token
distribution is taken as the mixture ½·(calibration frequencies) + ½·uniform over the vocabulary, scaled
to N positions: c_t = ½ count_t + ½ N / V. A token absent from calibration keeps the weight of a token
seen N/(2V) times, never 0 (at 0 its row would be free to drop).

Representation (decision): one compressed delta of all changed rows by the chosen method, PrinMix with
the row-weighted objective — it spends bits where rows are used (the allocation sees each rank's exact
weighted error), needs no second format, and the runtime serves it from the packed form. Alternatives
are measured by benchmarks/bench_vocab_rows.py at the same bytes (objective J, and the fine-tune's task
accuracy / logit error with only its embedding replaced): PrinMix without row weights, the k rows of
largest weighted error stored exactly plus PrinMix on the rest, low-rank. SmolLM2 pair, tied embedding,
49 151 changed rows × 576 at the whole-1/16 plan's α' = 0.0619 (3.34 MiB), 32 × 256 calibration tokens
(`bench_vocab_rows.py --pair /work/pairs/smollm2-arith --ratio 1/16`, 2026-12-05); J/J0 the objective's
relative error (its head part dominates: lookup < 0.00005 for all), task rows = relative Frobenius error
of the 17 rows of the arithmetic task's tokens:
    representation          MiB    J/J0    task rows
    exact rows            54.19  0          0
    dropped (base rows)    0      1          1
    prinmix-weighted       3.34   0.0004     0.773
    prinmix-plain          3.34   0.0004     0.766
    exact top-64 + rest    3.33   0.0004     0.784
    exact top-512 + rest   3.34   0.0004     0.806
    lowrank (fp16 SVD)     3.32   0.0009     0.776
(exact top-4096 rows alone exceed the budget.) The PrinMix variants tie on J and beat low-rank 2.2×;
storing the top rows exactly buys nothing, so the simplest form is kept. No representation keeps the
task's rows (77–81 % of their change lost): they are rare in the calibration text, and the fine-tune's
task accuracy does not need them (dropping the whole embedding delta costs 0.5 point: 0.910 vs 0.915,
benchmarks/README.md). Known limit: PrinMix's SVD basis is the plain SVD of ΔE_R (as for every
linear), not a weighted one, so the row weights act through the allocation, RTC and the quantisers only.

Budget sharing (split_budget): parts are given bits so as to minimise Σ_p f_p(B_p) under Σ B_p = B, f_p a
part's error curve — exactly on a grid, so that curves need not be convex; where they are, every part's
marginal error reduction per bit is then the same λ (one exchange rate; the Lagrange multiplier of Eq. 8
is a matrix's marginal error per bit). The curves are the caller's: relative errors of Eq. 8 weighted by
entries between an untied embedding and lm_head (whole_budget.compress_vocab_parts), the measured KL
divergences of pipeline/budget_split.py.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .allocation import allocate_bits
from .budget import prinmix_fixed_overhead_bits, prinmix_rank_cost_bits
from .lowrank_svd import thin_svd
from .prinmix_config import PrinMixConfig
from .width_simulation import simulate_width_errors

__all__ = ["LOOKUP_UNIFORM_SHARE", "decode_row_set", "encode_row_set", "lookup_weights", "prinmix_error_curve",
           "row_lookup_weights", "row_set_nbytes", "split_budget", "vocab_objective"]

LOOKUP_UNIFORM_SHARE = 0.5   # share of the lookup weight spread uniformly over the vocabulary (the floor)
ROW_SET_LIST, ROW_SET_MASK = 0, 1


def lookup_weights(counts: torch.Tensor, share: float = LOOKUP_UNIFORM_SHARE) -> torch.Tensor:
    """c_t = (1 − share)·count_t + share·N/V for token counts [V] over N = Σ counts positions (float64)."""
    counts = counts.to(torch.float64)
    n, v = float(counts.sum()), counts.numel()
    return (1.0 - share) * counts + share * (n / max(v, 1) if n > 0 else 1.0)


def row_lookup_weights(counts: torch.Tensor, n_rows: int, rows: torch.Tensor) -> torch.Tensor:
    """lookup_weights of a matrix of n_rows rows from token counts [V] (cut or zero-padded to n_rows: rows
    past the tokenizer's count were never seen), at `rows` int64 [n] → float64 [n]."""
    full = torch.zeros(n_rows, dtype=torch.float64)
    full[: min(counts.numel(), n_rows)] = counts[:n_rows].double()
    return lookup_weights(full)[rows]


def vocab_objective(residual: torch.Tensor, row_weights: torch.Tensor | None, H: torch.Tensor | None) -> float:
    """J(R) = Σ_t c_t ‖r_t‖² + tr(R H Rᵀ) in float64; R [n, d], c [n] or None, H [d, d] or None."""
    R = residual.to(torch.float64)
    out = 0.0
    if row_weights is not None:
        out += float((row_weights.to(torch.float64) * (R * R).sum(1)).sum())
    if H is not None:
        out += float(((R @ H.to(torch.float64)) * R).sum())
    return out


# ---- the set of changed rows, stored as one self-describing uint8 blob ---------------------------

def row_set_nbytes(n_index: int, n_rows: int) -> int:
    """Bytes of the row-set blob: 1 kind byte + the smaller of an int32 list and a bit mask over n_rows."""
    return 1 + min(4 * n_index, math.ceil(n_rows / 8))


def encode_row_set(index: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Sorted unique row ids [n] of a matrix of n_rows rows → uint8 blob (kind 0: int32 list, 1: bit mask,
    bit i of byte i//8 set when row i is in the set — whichever is smaller)."""
    idx = torch.unique(index.to(torch.int64))
    if idx.numel() and (int(idx[0]) < 0 or int(idx[-1]) >= n_rows):
        raise ValueError(f"row ids must lie in [0, {n_rows})")
    if 4 * idx.numel() <= math.ceil(n_rows / 8):
        body = idx.to(torch.int32).numpy().tobytes()
        return torch.frombuffer(bytearray(bytes([ROW_SET_LIST]) + body), dtype=torch.uint8)
    mask = torch.zeros(math.ceil(n_rows / 8) * 8, dtype=torch.bool)
    mask[idx] = True
    packed = np.packbits(mask.numpy(), bitorder="little")
    return torch.frombuffer(bytearray(bytes([ROW_SET_MASK]) + packed.tobytes()), dtype=torch.uint8)


def decode_row_set(blob: torch.Tensor, n_rows: int) -> torch.Tensor:
    """The sorted row ids int64 [n] of a row-set blob; ValueError when it is malformed."""
    data = blob.contiguous().numpy().tobytes()
    if not data:
        raise ValueError("empty row set")
    kind, body = data[0], data[1:]
    if kind == ROW_SET_LIST:
        if len(body) % 4:
            raise ValueError("row list length is not a multiple of 4")
        idx = torch.from_numpy(np.frombuffer(body, dtype="<i4").astype(np.int64))
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n_rows or bool((idx[1:] <= idx[:-1]).any())):
            raise ValueError("row list out of range or not strictly increasing")
        return idx
    if kind == ROW_SET_MASK:
        if len(body) != math.ceil(n_rows / 8):
            raise ValueError(f"row mask has {len(body)} bytes, {math.ceil(n_rows / 8)} expected")
        bits = np.unpackbits(np.frombuffer(body, dtype=np.uint8), bitorder="little")
        if bits[n_rows:].any():
            raise ValueError("row mask marks rows past the end")
        return torch.from_numpy(np.nonzero(bits[:n_rows])[0].astype(np.int64))
    raise ValueError(f"unknown row-set kind {kind}")


# ---- one exchange rate between parts --------------------------------------------------------------

def prinmix_error_curve(delta: torch.Tensor, H: torch.Tensor | None, row_weights: torch.Tensor | None,
                        budgets, config: PrinMixConfig | None = None) -> np.ndarray:
    """Relative error J(B)/J(0) of PrinMix's allocation (Eq. 8 with Eq. 5 errors, row-weighted objective)
    at each budget in `budgets` (bits of the blob), from ONE SVD and width simulation. [len(budgets)]"""
    cfg = config or PrinMixConfig()
    W = delta.to(torch.float32)
    h_out, h_in = W.shape
    Hm = torch.zeros(h_in, h_in) if H is None else H.to(torch.float32)
    U, S, Vh = thin_svd(W)
    rank_iso = H_v = None
    if row_weights is not None:
        c = row_weights.to(torch.float32)
        rank_iso = (c[:, None] * U * U).sum(0)
        s2 = S.double() ** 2
        rho_bar = float((s2 * rank_iso.double()).sum() / s2.sum().clamp_min(1e-300))
        H_v = Hm + rho_bar * torch.eye(h_in)
    elif H is None:
        Hm = torch.eye(h_in)
    widths = tuple(sorted(cfg.widths))
    E, _, _ = simulate_width_errors(S, Vh, Hm, widths, cfg, rank_iso=rank_iso, H_quant=H_v)
    E = E.numpy()
    j0 = float(E[:, widths.index(0)].sum()) if 0 in widths else float(E.max(1).sum())
    costs = np.array([prinmix_rank_cost_bits(b, h_out, h_in, cfg.v_group) for b in widths], dtype=np.int64)
    overhead = prinmix_fixed_overhead_bits(min(cfg.fmax, sum(b > 0 for b in widths)))
    out = []
    for b in budgets:
        avail = int(b) - overhead
        if avail < 0 or (0 not in widths and avail < E.shape[0] * int(costs.min())):
            out.append(1.0)
            continue
        out.append(allocate_bits(E, costs, avail, cfg.fmax).objective / max(j0, 1e-300))
    return np.asarray(out, dtype=np.float64)


def split_budget(curves: list, total_bits: int, grid: int = 32) -> list[int]:
    """Share total_bits between parts minimising Σ_p f_p(B_p), f_p a part's (weighted) error curve (a callable
    budgets → values, e.g. a partial of prinmix_error_curve): the exact minimum over budgets that are
    multiples of total_bits/grid (rounding to the largest part) summing to total_bits, by dynamic programming over the parts (O(P·grid²)).
    Where the curves are convex this is the one-exchange-rate optimum (every part's marginal error per bit
    the same λ); measured curves need not be convex, so no λ bisection. One part: all of it."""
    if len(curves) == 1:
        return [int(total_bits)]
    levels = np.array([total_bits * j // grid for j in range(grid + 1)], dtype=np.int64)
    values = [np.asarray(f(levels), dtype=np.float64) for f in curves]
    best = values[0].copy()                 # best[j]: least Σ over the parts so far using j grid steps
    choice = []
    for v in values[1:]:
        # total[j, k] = best[j − k] + v[k] for k ≤ j
        total = np.full((grid + 1, grid + 1), np.inf)
        for k in range(grid + 1):
            total[k:, k] = best[: grid + 1 - k] + v[k]
        choice.append(np.argmin(total, axis=1))
        best = total[np.arange(grid + 1), choice[-1]]
    steps, j = [], grid
    for pick in reversed(choice):
        k = int(pick[j])
        steps.append(k)
        j -= k
    steps.append(j)
    out = [int(levels[k]) for k in reversed(steps)]
    out[int(np.argmax(out))] += int(total_bits) - sum(out)   # the grid's rounding, to the largest part
    return out
