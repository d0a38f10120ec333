import torch

from fixtures.synthetic import calibration_hessian, synthetic_delta
from prinmix.algorithms.rtc import correct_reconstruction_target


def test_rtc_equals_least_squares():
    W = synthetic_delta(48, 64, seed=3).double()
    H, X = calibration_hessian(64, n_tokens=512, seed=4)
    X = X.double()
    v_hat = torch.randn(12, 64, generator=torch.Generator().manual_seed(5)).double()
    u = correct_reconstruction_target(W.float(), (X @ X.T).float(), v_hat.float(), damp=0.0).double()
    # Independent reference: min_Ũ ‖ΔW X − Ũ V̂ X‖ ⇔ (V̂X)ᵀ Ũᵀ = (ΔW X)ᵀ in least squares.
    ref = torch.linalg.lstsq((v_hat @ X).T, (W @ X).T).solution.T
    assert torch.allclose(u, ref, rtol=1e-3, atol=1e-4 * ref.abs().max())


def test_rtc_never_worse_than_plain_u_and_compensates_dropped_ranks():
    W = synthetic_delta(48, 64, seed=7)
    H, _ = calibration_hessian(64, seed=8)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    k = 10
    v_hat = Vh[:k] + 0.05 * torch.randn(k, 64, generator=torch.Generator().manual_seed(9))
    u_plain = U[:, :k] * S[:k]
    u_rtc = correct_reconstruction_target(W, H, v_hat, damp=0.0)

    def err(u):
        D = (W - u @ v_hat).double()
        return float(((D @ H.double()) * D).sum())

    assert err(u_rtc) < 0.9 * err(u_plain)


def test_rtc_empty_rank():
    out = correct_reconstruction_target(torch.randn(5, 7), torch.eye(7), torch.zeros(0, 7))
    assert out.shape == (5, 0)
