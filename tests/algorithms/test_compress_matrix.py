"""compress_matrix for every method: honest budget, blob round trip, and PrinMix beating the baselines."""

import numpy as np
import pytest
import torch

from fixtures.synthetic import calibration_hessian, synthetic_delta, weighted_error
from prinmix.algorithms.budget import budget_bits
from prinmix.algorithms.compress_matrix import PrinMixConfig, compress_matrix
from prinmix.algorithms.compressed_linear import CompressedLinear
from prinmix.errors import BudgetError

METHODS = ["prinmix", "deltacome", "lowrank"]


@pytest.mark.parametrize("seed", range(6))
def test_stored_bytes_within_budget_random_shapes_and_ratios(seed):
    rng = np.random.default_rng(seed)
    h_out, h_in = int(rng.integers(40, 200)), int(rng.integers(40, 200))
    ratio = float(2.0 ** -rng.uniform(3, 6))        # 1/8 … 1/64
    W = synthetic_delta(h_out, h_in, seed=seed)
    H, _ = calibration_hessian(h_in, n_tokens=256, seed=seed)
    for method in METHODS:
        out = compress_matrix(W, H, ratio, method)
        blob = out.to_blob()
        assert blob.numel() == out.nbytes()
        assert 8 * blob.numel() <= budget_bits(ratio, h_out, h_in), (method, h_out, h_in, ratio)


def test_prinmix_spends_most_of_the_budget():
    W = synthetic_delta(128, 192, seed=11)
    H, _ = calibration_hessian(192, seed=12)
    out = compress_matrix(W, H, 1 / 16)
    budget = budget_bits(1 / 16, 128, 192)
    cheapest_rank = 2 * (128 + 192) + 48
    assert 8 * out.nbytes() > budget - cheapest_rank - 8 * 100


@pytest.mark.parametrize("method", METHODS + ["bitdelta"])
def test_blob_round_trip_reconstructs_identically(method):
    W = synthetic_delta(64, 96, seed=2)
    H, _ = calibration_hessian(96, n_tokens=256, seed=3)
    out = compress_matrix(W, H, 1 / 16, method)
    back = CompressedLinear.from_blob(out.to_blob(), (64, 96), method)
    assert torch.equal(back.reconstruct(), out.reconstruct())
    assert back.rank_widths() == out.rank_widths()


def test_truncated_blob_is_rejected():
    out = compress_matrix(synthetic_delta(32, 48), None, 1 / 8)
    blob = out.to_blob()
    with pytest.raises(ValueError, match="truncated"):
        CompressedLinear.from_blob(blob[:-3], (32, 48), "prinmix")
    with pytest.raises(ValueError, match="trailing"):
        CompressedLinear.from_blob(torch.cat([blob, blob[:1]]), (32, 48), "prinmix")


@pytest.mark.parametrize("ratio", [1 / 16, 1 / 32])
@pytest.mark.parametrize("seed", [0, 1])
def test_prinmix_error_below_every_baseline(ratio, seed):
    h_out, h_in = 192, 256
    W = synthetic_delta(h_out, h_in, seed=seed)
    H, _ = calibration_hessian(h_in, seed=seed + 10)
    errs = {m: weighted_error(W, compress_matrix(W, H, ratio, m).reconstruct(), H) for m in METHODS}
    if ratio >= 1 / 16:
        errs["bitdelta"] = weighted_error(W, compress_matrix(W, H, ratio, "bitdelta").reconstruct(), H)
    for m, e in errs.items():
        if m != "prinmix":
            assert errs["prinmix"] < e, errs


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rtc_lowers_error(seed):
    W = synthetic_delta(160, 224, seed=seed)
    H, _ = calibration_hessian(224, seed=seed + 20)
    with_rtc = compress_matrix(W, H, 1 / 16, config=PrinMixConfig(rtc=True)).reconstruct()
    without = compress_matrix(W, H, 1 / 16, config=PrinMixConfig(rtc=False)).reconstruct()
    assert weighted_error(W, with_rtc, H) < weighted_error(W, without, H)


def test_allocation_objective_matches_simulated_errors_and_widths_are_contiguous():
    W = synthetic_delta(96, 128, seed=5)
    H, _ = calibration_hessian(128, seed=6)
    out = compress_matrix(W, H, 1 / 16, config=PrinMixConfig(fmax=3))
    widths = out.rank_widths()
    assert widths == sorted(widths, reverse=True)                  # equal widths contiguous
    assert len(set(widths)) + (1 if len(widths) < 96 else 0) <= 3   # 0 counts as a width
    E = out.info["errors"].numpy()
    cand = list(out.info["widths"])
    chosen = {i: w for i, w in zip(out.info["rank_index"], widths)}
    obj = sum(E[i, cand.index(chosen.get(i, 0))] for i in range(E.shape[0]))
    assert obj == pytest.approx(out.info["objective"], rel=1e-9)


def test_zero_delta_and_tiny_budget():
    out = compress_matrix(torch.zeros(32, 40), None, 1 / 16)
    assert torch.count_nonzero(out.reconstruct()) == 0
    with pytest.raises(BudgetError):
        compress_matrix(torch.randn(2, 3), None, 1 / 64)
    with pytest.raises(BudgetError):
        compress_matrix(torch.randn(16, 16), None, 1 / 32, "bitdelta")


def test_bad_inputs():
    with pytest.raises(ValueError, match="NaN"):
        compress_matrix(torch.tensor([[float("nan"), 1.0], [0.0, 1.0]]), None, 0.5)
    with pytest.raises(ValueError, match="H must be"):
        compress_matrix(torch.randn(4, 5), torch.eye(4), 0.5)
    with pytest.raises(ValueError, match="unknown method"):
        compress_matrix(torch.randn(4, 5), None, 0.5, "zip")
