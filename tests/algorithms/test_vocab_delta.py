"""Vocabulary-matrix deltas: the row-weighted objective against float64 brute force, row-weighted RTC
against per-row least squares, row sets, budget sharing."""

import itertools

import numpy as np
import pytest
import torch

from prinmix.algorithms.prinmix_config import PrinMixConfig
from prinmix.algorithms.rtc import correct_reconstruction_target, correct_reconstruction_target_rows
from prinmix.algorithms.vocab_delta import (
    decode_row_set,
    encode_row_set,
    lookup_weights,
    prinmix_error_curve,
    row_set_nbytes,
    split_budget,
    vocab_objective,
)
from prinmix.algorithms.width_simulation import simulate_width_errors


def _tied_case(seed=0, V=40, d=12, N=300):
    g = torch.Generator().manual_seed(seed)
    dE = torch.randn(V, d, generator=g, dtype=torch.float64) * 0.1
    tokens = torch.randint(0, V // 2, (N,), generator=g)      # half the vocabulary never appears
    h = torch.randn(N, d, generator=g, dtype=torch.float64)
    return dE, tokens, h


def test_tied_objective_is_lookup_plus_head_error_brute_force():
    """J(R) with c = token counts and H = Σ hhᵀ equals Σ over positions of the input-vector error of the
    lookup plus the logit error of the head, computed position by position in float64."""
    dE, tokens, h = _tied_case()
    approx = dE + torch.randn_like(dE) * 0.03
    brute = 0.0
    for t, hv in zip(tokens.tolist(), h):
        brute += float(((dE[t] - approx[t]) ** 2).sum())          # lookup of token t
        brute += float(((dE @ hv - approx @ hv) ** 2).sum())      # logits of the tied head
    counts = torch.bincount(tokens, minlength=dE.shape[0])
    J = vocab_objective(dE - approx, counts.double(), h.T @ h)
    assert J == pytest.approx(brute, rel=1e-10)


def test_lookup_weights_floor_keeps_unseen_tokens():
    counts = torch.tensor([10.0, 0.0, 30.0, 0.0], dtype=torch.float64)
    c = lookup_weights(counts)
    assert torch.allclose(c, 0.5 * counts + 0.5 * 40 / 4)
    assert float(c.min()) > 0
    assert float(c.sum()) == pytest.approx(float(counts.sum()))   # still N positions in all


def test_row_weighted_rtc_is_per_row_least_squares():
    g = torch.Generator().manual_seed(1)
    n, d, k = 30, 10, 4
    W = torch.randn(n, d, generator=g)
    X = torch.randn(d, 50, generator=g)
    H = X @ X.T
    v_hat = torch.randn(k, d, generator=g)
    c = torch.rand(n, generator=g) * 20
    got = correct_reconstruction_target_rows(W, H, v_hat, c, damp=0.0)
    for t in range(n):
        Ht = (H + c[t] * torch.eye(d)).double()
        ref = torch.linalg.solve(v_hat.double() @ Ht @ v_hat.double().T, v_hat.double() @ Ht @ W[t].double())
        assert torch.allclose(got[t].double(), ref, rtol=1e-4, atol=1e-5)
    # no row weights: the unweighted closed form
    assert torch.allclose(correct_reconstruction_target_rows(W, H, v_hat, torch.zeros(n)),
                          correct_reconstruction_target(W, H, v_hat), rtol=1e-4, atol=1e-5)


def test_rank_error_with_row_weights_is_exact_brute_force():
    """Eq. 5 with row weights: a rank-1 delta σ u vᵀ with V quantised has J = σ² ΔV (H + ρ I) ΔVᵀ,
    ρ = Σ_t c_t u_t² — checked against the row-by-row float64 objective of the quantised rank."""
    g = torch.Generator().manual_seed(2)
    n, d = 50, 16
    u = torch.randn(n, generator=g)
    u /= u.norm()
    v = torch.randn(d, generator=g)
    v /= v.norm()
    sigma = torch.tensor([3.0])
    X = torch.randn(d, 40, generator=g)
    H = X @ X.T
    c = torch.rand(n, generator=g) * 30
    rho = (c * u * u)[None].sum(1)
    cfg = PrinMixConfig(widths=(0, 2, 4))
    E, sim, nonzero = simulate_width_errors(sigma, v[None], H, cfg.widths, cfg, rank_iso=rho)
    for j, b in enumerate(cfg.widths):
        v_hat = torch.zeros(d) if b == 0 else sim.rows(torch.tensor([nonzero.index(b)]))[0][0]
        R = sigma * u[:, None] * (v - v_hat)[None, :]
        assert float(E[0, j]) == pytest.approx(vocab_objective(R, c, H), rel=1e-4)


@pytest.mark.parametrize("n_rows,ids", [(100, [3, 7, 99]), (1000, list(range(0, 1000, 3))), (9, [])])
def test_row_set_round_trip_and_size(n_rows, ids):
    idx = torch.tensor(ids, dtype=torch.int64)
    blob = encode_row_set(idx, n_rows)
    assert blob.numel() == row_set_nbytes(len(ids), n_rows)
    assert torch.equal(decode_row_set(blob, n_rows), idx)


def test_row_set_rejects_corruption():
    blob = encode_row_set(torch.tensor([1, 5]), 1000)
    bad = blob.clone()
    bad[0] = 7
    with pytest.raises(ValueError):
        decode_row_set(bad, 1000)
    with pytest.raises(ValueError):
        decode_row_set(blob, 4)    # ids beyond the matrix


def test_error_curve_decreases_and_split_follows_the_exchange_rate():
    g = torch.Generator().manual_seed(3)
    easy = torch.randn(64, 2, generator=g) @ torch.randn(2, 16, generator=g)     # rank 2: cheap to capture
    hard = torch.randn(64, 16, generator=g)                                     # full rank
    budgets = np.array([0, 2000, 4000, 8000, 16000])
    curve = prinmix_error_curve(hard, None, None, budgets)
    assert curve[0] == pytest.approx(1.0) and np.all(np.diff(curve) <= 1e-12)
    total = 12000
    parts = split_budget([lambda b: prinmix_error_curve(easy, None, None, b),
                          lambda b: prinmix_error_curve(hard, None, None, b)], total)
    assert sum(parts) <= total and parts[1] > parts[0]   # the full-rank part needs the bits
    best = min(prinmix_error_curve(easy, None, None, [s])[0] + prinmix_error_curve(hard, None, None, [total - s])[0]
               for s in range(0, total + 1, total // 16))
    got = prinmix_error_curve(easy, None, None, [parts[0]])[0] + prinmix_error_curve(hard, None, None, [parts[1]])[0]
    assert got <= best + 0.02


def test_split_budget_is_the_exact_grid_optimum_for_non_convex_curves():
    """Random (non-convex) curves of 2–3 parts: split_budget's shares reach the brute-force minimum over every
    way of dividing the grid's steps, and always sum to the total."""
    rng = np.random.default_rng(0)
    for trial in range(60):
        parts, grid = int(rng.integers(2, 4)), 12
        total = 1200 if trial % 2 else 1001
        tables = [rng.random(grid + 1) for _ in range(parts)]
        curves = [lambda b, t=t: t[np.minimum(np.asarray(b) * grid // total, grid).astype(int)] for t in tables]
        got = split_budget(curves, total, grid)
        assert sum(got) == total and all(b >= 0 for b in got)
        if total % grid == 0:
            value = sum(float(f([b])[0]) for f, b in zip(curves, got))
            best = min(sum(t[k] for t, k in zip(tables, ks))
                       for ks in itertools.product(range(grid + 1), repeat=parts) if sum(ks) == grid)
            assert value == pytest.approx(best, abs=1e-12)
