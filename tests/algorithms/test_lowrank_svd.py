"""svd_of_product: exact thin SVD of B·A from QRs of the factors, against the dense SVD."""

from __future__ import annotations

import pytest
import torch

from prinmix.algorithms.lowrank_svd import svd_of_product


@pytest.mark.parametrize("m,n,r", [(48, 80, 6), (80, 48, 6), (12, 9, 16), (64, 64, 64)])
def test_matches_dense_svd(m, n, r):
    g = torch.Generator().manual_seed(m * 1000 + n + r)
    B = torch.randn(m, r, generator=g, dtype=torch.float64)
    A = torch.randn(r, n, generator=g, dtype=torch.float64) * torch.logspace(0, -3, r, dtype=torch.float64)[:, None]
    U, S, Vh = svd_of_product(B, A, out_dtype=None)
    k = min(m, n, r)
    assert U.shape == (m, k) and S.shape == (k,) and Vh.shape == (k, n)
    dense = B @ A
    S_ref = torch.linalg.svdvals(dense)[:k]
    assert torch.allclose(S, S_ref, rtol=1e-10, atol=1e-12 * float(S_ref[0]))
    assert torch.allclose((U * S) @ Vh, dense, atol=1e-11 * float(dense.abs().max()))
    assert torch.allclose(U.T @ U, torch.eye(k, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(Vh @ Vh.T, torch.eye(k, dtype=torch.float64), atol=1e-10)
    assert bool((S[:-1] >= S[1:]).all())


def test_singular_vectors_agree_with_dense_up_to_sign():
    g = torch.Generator().manual_seed(0)
    B, A = torch.randn(40, 5, generator=g), torch.randn(5, 30, generator=g)
    U, S, Vh = svd_of_product(B, A)                          # float64 compute, float32 out
    assert U.dtype == S.dtype == Vh.dtype == torch.float32
    U_ref, S_ref, Vh_ref = torch.linalg.svd((B.double() @ A.double()), full_matrices=False)
    signs = torch.sign((U.double() * U_ref[:, :5]).sum(0))
    assert torch.allclose(U.double() * signs, U_ref[:, :5], atol=1e-5)
    assert torch.allclose(Vh.double() * signs[:, None], Vh_ref[:5], atol=1e-5)
    assert torch.allclose(S.double(), S_ref[:5], rtol=1e-6)


def test_rank_deficient_and_float32():
    g = torch.Generator().manual_seed(1)
    B = torch.randn(30, 4, generator=g)
    B[:, 3] = B[:, 0]                                        # product has rank 3
    A = torch.randn(4, 20, generator=g)
    A[3] = 0
    U, S, Vh = svd_of_product(B, A, dtype=torch.float32)
    assert float(S[3]) < 1e-5 * float(S[0])
    assert torch.allclose((U * S) @ Vh, B @ A, atol=1e-4)


def test_bad_shapes():
    with pytest.raises(ValueError, match="need B"):
        svd_of_product(torch.zeros(3, 2), torch.zeros(3, 4))
