"""Reconstruction Target Correction (PrinMix paper Eq. 7 / Appendix A.3), in closed form.

After V is quantised to V̂, U is re-fitted so that Ũ V̂ X best reproduces the *full* delta's
output ΔW X (not only the kept ranks' U Σ V X, so it also compensates dropped ranks):

    Ũ = argmin ‖ΔW X − Ũ V̂ X‖²_F = ΔW H V̂ᵀ (V̂ H V̂ᵀ + λ I)⁻¹,   H = X Xᵀ

Σ is folded into Ũ (Ũ here is the paper's Ũ Σ). λ = damp · mean(diag(V̂ H V̂ᵀ)) keeps the
k×k system well conditioned (damp = 0 gives the exact least-squares solution).
"""

from __future__ import annotations

import torch


def correct_reconstruction_target(delta: torch.Tensor, H: torch.Tensor, v_hat: torch.Tensor,
                                  damp: float = 1e-4) -> torch.Tensor:
    """Ũ [h_out, k] for ΔW [h_out, h_in], H = XXᵀ [h_in, h_in], V̂ [k, h_in]; float32 on delta's device."""
    k = v_hat.shape[0]
    if k == 0:
        return torch.zeros(delta.shape[0], 0, dtype=torch.float32, device=delta.device)
    delta, H, v_hat = (t.to(torch.float32) for t in (delta, H, v_hat))
    hv = H @ v_hat.T                                   # [h_in, k]
    gram = v_hat @ hv                                  # V̂ H V̂ᵀ [k, k]
    gram = 0.5 * (gram + gram.T)
    diag_mean = gram.diagonal().mean().clamp_min(1e-30)
    eye = torch.eye(k, dtype=gram.dtype, device=gram.device)
    rhs = delta @ hv                                   # ΔW H V̂ᵀ [h_out, k]
    # Solve in float64: the gram matrix of nearly collinear quantised rows can be ill-conditioned.
    gram64 = gram.double() + damp * diag_mean.double() * eye.double()
    try:
        chol = torch.linalg.cholesky(gram64)
        sol = torch.cholesky_solve(rhs.double().T, chol).T
    except RuntimeError:  # singular even after damping (e.g. dead calibration): least squares
        sol = torch.linalg.lstsq(gram64, rhs.double().T).solution.T
    return sol.to(torch.float32)
