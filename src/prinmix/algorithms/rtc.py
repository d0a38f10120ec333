"""Reconstruction Target Correction (PrinMix paper Eq. 7 / Appendix A.3), in closed form.

After V is quantised to V̂, U is re-fitted so that Ũ V̂ X best reproduces the *full* delta's
output ΔW X (not only the kept ranks' U Σ V X, so it also compensates dropped ranks):

    Ũ = argmin ‖ΔW X − Ũ V̂ X‖²_F = ΔW H V̂ᵀ (V̂ H V̂ᵀ + λ I)⁻¹,   H = X Xᵀ

Σ is folded into Ũ (Ũ here is the paper's Ũ Σ). λ = damp · mean(diag(V̂ H V̂ᵀ)) keeps the
k×k system well conditioned (damp = 0 gives the exact least-squares solution).

Row-weighted form (vocabulary matrices, objective Σ_t r_t (H + c_t I) r_tᵀ): every output row t has
its own Hessian H_t = H + c_t I, so ũ_t = ΔW_t H_t V̂ᵀ (V̂ H_t V̂ᵀ + λ I)⁻¹ row by row. With
A = V̂V̂ᵀ and B = V̂HV̂ᵀ + λI = LLᵀ, one eigendecomposition L⁻¹AL⁻ᵀ = QΛQᵀ gives
(B + c_t A)⁻¹ = L⁻ᵀQ (I + c_t Λ)⁻¹ QᵀL⁻¹ for every row at once (no per-row solve).
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


def correct_reconstruction_target_rows(delta: torch.Tensor, H: torch.Tensor, v_hat: torch.Tensor,
                                       row_weights: torch.Tensor, damp: float = 1e-4) -> torch.Tensor:
    """Ũ [h_out, k] minimising Σ_t ‖(ΔW_t − ũ_t V̂)‖²_{H + c_t I} row by row (module docstring);
    ΔW [h_out, h_in], H [h_in, h_in] (may be 0), V̂ [k, h_in], row_weights c [h_out] ≥ 0."""
    k = v_hat.shape[0]
    if k == 0:
        return torch.zeros(delta.shape[0], 0, dtype=torch.float32, device=delta.device)
    d, H, v, c = (t.to(torch.float64) for t in (delta, H, v_hat, row_weights))
    A = v @ v.T
    B = v @ H @ v.T
    A, B = 0.5 * (A + A.T), 0.5 * (B + B.T)
    # λ as in the unweighted solve, on the mean row's gram (B + c̄A), so c ≡ 0 reproduces it exactly
    lam = damp * (B + c.mean() * A).diagonal().mean().clamp_min(1e-30)
    eye = torch.eye(k, dtype=torch.float64, device=d.device)
    B = B + lam * eye
    if float(B.diagonal().min()) <= 1e-300 * float(A.diagonal().max()):
        B = B + 1e-12 * A.diagonal().mean() * eye   # H = 0 (lookup only): B is λ I alone
    L = torch.linalg.cholesky(B)
    Linv = torch.linalg.solve_triangular(L, eye, upper=False)
    lam_a, Q = torch.linalg.eigh(Linv @ A @ Linv.T)
    P = Linv.T @ Q                                   # [k, k]: (B + c A)⁻¹ = P diag(1/(1 + c λ)) Pᵀ
    rhs = d @ (H @ v.T) + c[:, None] * (d @ v.T)     # ΔW_t H_t V̂ᵀ [h_out, k]
    sol = ((rhs @ P) / (1.0 + c[:, None] * lam_a.clamp_min(0)[None, :])) @ P.T
    return sol.to(torch.float32)
