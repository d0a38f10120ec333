"""Per-matrix compress time at Qwen2.5-7B linear shapes (one call of compress_matrix each).

ΔW is a synthetic fine-tune update (benchmarks/bench_kernels.synthetic_delta: a rank-64 part with a
decaying spectrum plus noise); H = XᵀX/n from n = 1024 random activations with a few outlier
channels (the calibration statistics GPTQ and RTC use). Printed: seconds per matrix (after one
warm-up call on a small matrix), the kept rank, the widths used and the stored bytes against the budget.

    python benchmarks/bench_compress_shapes.py              # GPU when present, Qwen2.5-7B shapes
    python benchmarks/bench_compress_shapes.py --smoke      # shapes / 16
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import QWEN_7B, synthetic_delta  # noqa: E402

from prinmix.algorithms.budget import budget_bits  # noqa: E402
from prinmix.algorithms.compress_matrix import compress_matrix  # noqa: E402


def hessian(h_in: int, device, n: int = 1024, seed: int = 0) -> torch.Tensor:
    """XᵀX/n [h_in, h_in] of random activations, 1 % of the channels 20× larger (outliers)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h_in, generator=g)
    x[:, torch.randperm(h_in, generator=g)[: max(1, h_in // 100)]] *= 20
    x = x.to(device)
    return x.T @ x / n


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--ratio", type=float, default=1 / 16)
    p.add_argument("--method", default="prinmix")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    scale = 16 if args.smoke else 1
    compress_matrix(synthetic_delta(64, 64, 0, device), hessian(64, device), args.ratio, args.method)   # warm-up
    print(f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, {args.method}, "
          f"ratio {args.ratio:.4f}\n")
    head = f"{'linear':>18} {'shape':>14} | {'seconds':>7} | {'rank':>5} {'widths':>14} | {'stored/budget':>13}"
    print(head)
    print("-" * len(head))
    for name, (h_out, h_in) in QWEN_7B.items():
        h_out, h_in = h_out // scale, h_in // scale
        delta, H = synthetic_delta(h_out, h_in, 1, device), hessian(h_in, device)
        _sync(device)
        t0 = time.perf_counter()
        m = compress_matrix(delta, H, args.ratio, args.method)
        _sync(device)
        seconds = time.perf_counter() - t0
        widths = ",".join(str(b.bits) for b in m.blocks)
        rank = sum(b.rank for b in m.blocks)
        used = 8 * m.nbytes() / budget_bits(args.ratio, h_out, h_in)
        print(f"{name:>18} {f'[{h_out}, {h_in}]':>14} | {seconds:>7.2f} | {rank:>5} {widths:>14} | {used:>12.3f}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
