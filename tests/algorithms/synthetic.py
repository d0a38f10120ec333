"""Synthetic deltas with a realistic spectrum and calibration activations with outlier channels."""

import torch


def synthetic_delta(h_out: int, h_in: int, seed: int = 0, decay: float = 0.8, noise: float = 0.02):
    """ΔW = U diag(σ) V + small dense noise, σ_i ∝ (i+1)^-decay (fine-tune deltas: fast-decaying spectrum)."""
    g = torch.Generator().manual_seed(seed)
    r = min(h_out, h_in)
    U, _ = torch.linalg.qr(torch.randn(h_out, r, generator=g))
    V, _ = torch.linalg.qr(torch.randn(h_in, r, generator=g))
    sigma = (torch.arange(r) + 1.0) ** -decay
    W = (U * sigma) @ V.T
    return (W + noise * torch.randn(h_out, h_in, generator=g) / h_in ** 0.5).float()


def calibration_hessian(h_in: int, n_tokens: int = 2048, seed: int = 1, n_outliers: int = 4):
    """H = XXᵀ for X [h_in, n_tokens] with correlated channels and a few high-variance outliers."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(h_in, h_in, generator=g) / h_in ** 0.5 + torch.eye(h_in)
    X = mix @ torch.randn(h_in, n_tokens, generator=g)
    X[torch.randperm(h_in, generator=g)[:n_outliers]] *= 10.0
    return X @ X.T, X


def weighted_error(delta: torch.Tensor, approx: torch.Tensor, H: torch.Tensor) -> float:
    """tr((ΔW − ΔŴ) H (ΔW − ΔŴ)ᵀ) = ‖(ΔW − ΔŴ) X‖²_F, in float64."""
    D = (delta - approx).double()
    return float(((D @ H.double()) * D).sum())
