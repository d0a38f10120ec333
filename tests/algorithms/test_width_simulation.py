"""Eq. 5's width simulation: chunked = stacked = an independent GPTQ per width; E is σ²·ΔV H ΔVᵀ."""

import pytest
import torch

from fixtures.synthetic import calibration_hessian, synthetic_delta
from prinmix.algorithms.gptq import gptq_quantize
from prinmix.algorithms.prinmix_config import PrinMixConfig
from prinmix.algorithms.width_simulation import WidthSimulation, simulate_width_errors


@pytest.mark.parametrize("v_group", [None, 32])
def test_width_simulation_in_chunks_equals_one_stacked_call(v_group):
    """Memory-bounded simulation (one width per GPTQ call, shared H factorisation) = all widths stacked in one
    call, and = an independent GPTQ per width; rows() rebuilds GPTQ's own dequantised rows exactly.

    Separate GPTQ calls may differ in the last float bits (multi-threaded BLAS picks kernels by alignment;
    measured with 2 threads: one group's float16 scale one ulp apart), so across calls codes must agree but
    for rare rounding ties and values to that tolerance."""
    W = synthetic_delta(48, 96, seed=3)
    H, _ = calibration_hessian(96, seed=4)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    cfg = PrinMixConfig(v_group=v_group)
    E1, sim1, nonzero = simulate_width_errors(S, Vh, H, cfg.widths, cfg)
    E2, sim2, _ = simulate_width_errors(S, Vh, H, cfg.widths, cfg, chunk_bytes=1)   # one width per call
    assert torch.allclose(E1, E2, rtol=1e-4, atol=1e-9 * float(E1.max()))
    assert float((sim1.codes != sim2.codes).float().mean()) < 1e-3
    r = S.numel()
    for k, b in enumerate(nonzero):  # an independent reference: GPTQ at width b alone
        ref = gptq_quantize(Vh, H, b, group_size=v_group, percdamp=cfg.percdamp, blocksize=cfg.blocksize)
        exact, _, _, _ = WidthSimulation(ref.codes, ref.scale, ref.zero, ref.group_bounds).rows(torch.arange(r))
        assert torch.equal(exact, ref.dequant)                     # rows() = GPTQ's own dequant, bit for bit
        dequant, codes, _, _ = sim2.rows(torch.arange(k * r, (k + 1) * r))
        assert float((codes != ref.codes).float().mean()) < 1e-3
        # a float16 scale one ulp apart (≈ 1e-3 relative) is the largest cross-call difference
        assert float((dequant - ref.dequant).norm()) <= 2e-3 * float(ref.dequant.norm())
        j = cfg.widths.index(b)
        dV = (Vh - dequant).double()                               # E is σ²·ΔV H ΔVᵀ of the simulation's own rows
        expected = S.double() ** 2 * ((dV @ H.double()) * dV).sum(1)
        assert torch.allclose(E2[:, j], expected.clamp_min(0), rtol=1e-3, atol=1e-7 * float(expected.max()))
