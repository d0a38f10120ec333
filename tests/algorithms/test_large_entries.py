"""A very large delta entry (1e5, 1e7: far beyond float16) is stored finite and reproduced, by every SVD method;
BitDelta's single scale stays finite (its L2-optimal value, mean |ΔW|, is tiny against the spike by design)."""

from __future__ import annotations

import pytest
import torch

from prinmix.algorithms.compress_matrix import compress_matrix


@pytest.mark.parametrize("spike", [1e5, 1e7])
@pytest.mark.parametrize("method", ["prinmix", "deltacome", "lowrank", "bitdelta"])
def test_spike_is_stored_finite_and_reproduced(method, spike):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(64, 512, generator=g, dtype=torch.float64)
    H = (X @ X.T).float()
    W = torch.randn(128, 64, generator=g) * 0.01
    W[3, 5] = spike
    m = compress_matrix(W.clone(), H, 1 / 16, method)
    assert m.nonfinite_field() is None
    dw = m.reconstruct(torch.float64)
    assert bool(torch.isfinite(dw).all())
    if method == "bitdelta":
        assert float(dw.abs().max()) == pytest.approx(float(W.double().abs().mean()), rel=1e-3)
    else:
        assert abs(float(dw[3, 5]) - spike) < 0.01 * spike, float(dw[3, 5])
