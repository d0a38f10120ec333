"""all_finite (the fast NaN/Inf test of CheckpointReader.get) against torch.isfinite entry by entry."""

from __future__ import annotations

import pytest
import torch

from prinmix.checkpoint.reader import all_finite


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_matches_isfinite(dtype):
    g = torch.Generator().manual_seed(0)
    big = torch.finfo(dtype).max
    cases = [torch.randn(257, generator=g, dtype=dtype), torch.full((4,), big, dtype=dtype),
             torch.tensor([big, -big, big], dtype=dtype)]  # finite, but their float32 sum overflows
    for bad in (float("nan"), float("inf"), -float("inf")):
        t = torch.randn(257, generator=g, dtype=dtype)
        t[100] = bad
        cases.append(t)
    for t in cases:
        assert all_finite(t) == bool(torch.isfinite(t).all()), t
