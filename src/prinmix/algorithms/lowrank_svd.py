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


class FactoredDelta:
    """ΔW = left·right kept as its factors (a LoRA delta: left = s·B [h_out, r], right = A [r, h_in]).

    Offers what the compressors use of a dense ΔW: `shape`, `device`, `ΔW @ M` (as left·(right·M)),
    a thin SVD from the factors (`thin_svd`), and `dense()` where a method needs every entry (BitDelta).
    """

    def __init__(self, left: torch.Tensor, right: torch.Tensor) -> None:
        if left.ndim != 2 or right.ndim != 2 or left.shape[1] != right.shape[0]:
            raise ValueError(f"need left [m, r] and right [r, n], got {list(left.shape)} and {list(right.shape)}")
        self.left, self.right = left, right

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.left.shape[0], self.right.shape[1]))

    @property
    def device(self) -> torch.device:
        return self.left.device

    @property
    def ndim(self) -> int:
        return 2

    def to(self, *args, **kwargs) -> "FactoredDelta":
        return FactoredDelta(self.left.to(*args, **kwargs), self.right.to(*args, **kwargs))

    def __matmul__(self, other: torch.Tensor) -> torch.Tensor:
        return self.left @ (self.right @ other)

    def dense(self) -> torch.Tensor:
        return self.left @ self.right

    def is_finite(self) -> bool:
        return bool(torch.isfinite(self.left).all() and torch.isfinite(self.right).all())

    def any(self) -> bool:
        return bool(torch.any(self.left) and torch.any(self.right))


def thin_svd(delta) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, S, Vh) float32 of a dense ΔW [m, n] (k = min(m, n) ranks) or of a FactoredDelta (k ≤ its rank)."""
    if isinstance(delta, FactoredDelta):
        return svd_of_product(delta.left, delta.right, out_dtype=torch.float32)
    return torch.linalg.svd(delta, full_matrices=False)
