"""Thin SVD of a low-rank product B·A without forming it (used for LoRA deltas ΔW = s·B·A).

With reduced QRs B = Q_B R_B and Aᵀ = Q_A R_A,   B·A = Q_B (R_B R_Aᵀ) Q_Aᵀ,
so the SVD of the small k×k core R_B R_Aᵀ = U_c Σ V_cᵀ gives B·A = (Q_B U_c) Σ (Q_A V_c)ᵀ exactly
(up to float rounding). Cost O((m + n)·r²) instead of O(m·n·min(m, n)) for the dense SVD.
"""

from __future__ import annotations

import torch


def svd_of_product(B: torch.Tensor, A: torch.Tensor, dtype: torch.dtype = torch.float64,
                   out_dtype: torch.dtype | None = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U [m, k], S [k], Vh [k, n]) with B·A = U·diag(S)·Vh, k = min(m, n, r), S descending, U/Vh orthonormal.

    B: [m, r], A: [r, n] (any float dtype, same device). Computed in `dtype` (float64 by default:
    the factors are small), returned in `out_dtype` (None: `dtype`).
    """
    if B.ndim != 2 or A.ndim != 2 or B.shape[1] != A.shape[0]:
        raise ValueError(f"need B [m, r] and A [r, n], got {list(B.shape)} and {list(A.shape)}")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be float32 or float64, got {dtype}")
    q_b, r_b = torch.linalg.qr(B.to(dtype))                 # [m, kb], [kb, r]
    q_a, r_a = torch.linalg.qr(A.T.to(dtype))               # [n, ka], [ka, r]
    core = r_b @ r_a.T                                      # [kb, ka]
    u_c, s, vh_c = torch.linalg.svd(core, full_matrices=False)
    U, Vh = q_b @ u_c, vh_c @ q_a.T
    k = min(B.shape[0], A.shape[1], B.shape[1])
    U, s, Vh = U[:, :k], s[:k], Vh[:k]
    out = out_dtype or dtype
    return U.to(out), s.to(out), Vh.to(out)
