"""Delta products at decode shapes: Triton kernels vs the torch reference vs the cached dense factors.

For each Qwen2.5-7B linear shape and each decode batch of R rows (R tenants, or all --tenants when
fewer rows than tenants… each row its own tenant up to --tenants, then round robin), the deltas are
PrinMix compressions (widths 2–8 within one matrix) of a synthetic ΔW with a decaying spectrum plus
noise. Every backend's output is checked against the torch reference first (the run stops on a
mismatch), then timed (median of --reps, CUDA events on a GPU):

    µs triton / torch / cached   time of the delta product alone (DeltaLinear minus its base GEMM)
    packed KiB                   packed bytes of the tenants the rows touch (what the kernel must read)
    bound µs                     packed bytes / memory bandwidth (measured in the same run: a 1 GiB copy)
    triton / bound               the issue's target on a GPU: ≤ 2

    python benchmarks/bench_kernels.py                  # GPU: Qwen2.5-7B shapes
    python benchmarks/bench_kernels.py --smoke          # CPU: Triton's interpreter, shapes / 32
    python benchmarks/bench_kernels.py --sweep          # also time tile sizes (KernelBlocks) at each R
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")          # before the first import of triton

from prinmix.algorithms.compress_matrix import compress_matrix  # noqa: E402
from prinmix.runtime.delta_linear import DeltaLinear, TenantBatch, TenantDelta  # noqa: E402
from prinmix.runtime.factor_cache import FactorCache  # noqa: E402
from prinmix.runtime.packed import PackedLinear  # noqa: E402

QWEN_7B = {"q_proj, o_proj": (3584, 3584), "k_proj, v_proj": (512, 3584), "gate_proj, up_proj": (18944, 3584),
           "down_proj": (3584, 18944)}
SWEEP = [(16, 16, 32, 32), (16, 16, 64, 64), (16, 32, 64, 64), (16, 16, 128, 64), (16, 16, 64, 128),
         (32, 32, 64, 64)]


def synthetic_delta(h_out: int, h_in: int, seed: int, device) -> torch.Tensor:
    """ΔW [h_out, h_in]: rank-min(64, h) part with singular values decaying 100× plus 20 % Gaussian noise,
    scaled like a fine-tune's update (~1e-3 of unit-scale weights)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    r = min(64, h_out, h_in)
    u = torch.linalg.qr(torch.randn(h_out, r, generator=g))[0]
    v = torch.linalg.qr(torch.randn(h_in, r, generator=g))[0].T
    s = torch.logspace(0, -2, r)
    low = (u * s) @ v
    noise = torch.randn(h_out, h_in, generator=g) * 0.2 * low.norm() / (h_out * h_in) ** 0.5
    return ((low + noise) / low.norm() * 1e-3 * (h_out * h_in) ** 0.5).to(device)


def _timer(device):
    if device.type == "cuda":
        def measure(fn, reps):
            times = []
            for _ in range(reps):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                torch.cuda.synchronize()
                times.append(a.elapsed_time(b) * 1e3)
            return statistics.median(times)
    else:
        def measure(fn, reps):
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e6)
            return statistics.median(times)
    return measure


def bandwidth(device, measure) -> float:
    """Bytes/s of a device-to-device copy (read + write counted)."""
    n = (1 << 30) if device.type == "cuda" else (1 << 26)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    return 2 * n / (measure(lambda: dst.copy_(src), 5) * 1e-6)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU-sized shapes (/32), 2 tenants, 1 rep")
    p.add_argument("--tenants", type=int, default=32)
    p.add_argument("--rows", default="1,4,16,64")
    p.add_argument("--ratio", type=float, default=1 / 16)
    p.add_argument("--distinct", type=int, default=1, help="distinct compressions per shape (tenants cycle)")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--sweep", action="store_true")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    scale, reps = (32, 1) if args.smoke else (1, args.reps)
    rows_list = [int(r) for r in args.rows.split(",")]
    if args.smoke:
        rows_list, args.tenants, args.distinct = rows_list[:2], min(args.tenants, 2), 1
    from prinmix.runtime.triton_kernels import KernelBlocks, add_deltas

    measure = _timer(device)
    bw = bandwidth(device, measure)
    print(f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu (Triton interpreter)'}, "
          f"{dtype}, copy bandwidth {bw / 1e9:.0f} GB/s, {args.tenants} tenants, ratio {args.ratio:.4f}\n")
    head = (f"{'linear':>18} {'R':>3} | {'triton µs':>9} {'torch µs':>9} {'cached µs':>9} | {'packed KiB':>10} "
            f"{'bound µs':>8} {'triton/bound':>12}")
    print(head)
    print("-" * len(head))
    sweep_rows = []
    for name, (h_out, h_in) in QWEN_7B.items():
        h_out, h_in = h_out // scale, h_in // scale
        t0 = time.perf_counter()
        compressed = [compress_matrix(synthetic_delta(h_out, h_in, i, device), None, args.ratio, "prinmix")
                      for i in range(args.distinct)]
        widths = sorted({b.bits for c in compressed for b in c.blocks})
        print(f"# {name} [{h_out}, {h_in}]: compressed in {time.perf_counter() - t0:.1f} s, widths {widths}, "
              f"rank {[sum(b.rank for b in c.blocks) for c in compressed]}", flush=True)
        torch.manual_seed(0)
        base = torch.nn.Linear(h_in, h_out, bias=False).to(device, dtype)
        layers = {"triton": DeltaLinear(base, backend="triton"), "torch": DeltaLinear(base, backend="torch"),
                  "cached": DeltaLinear(base, backend="cached", factor_cache=FactorCache(1 << 40, dtype))}
        for slot in range(args.tenants):
            packed = PackedLinear.from_compressed(compressed[slot % len(compressed)])
            for layer in layers.values():
                layer.load_tenant(slot, TenantDelta(packed))
        for n_rows in rows_list:
            x = torch.randn(n_rows, h_in, device=device, dtype=dtype)
            batch = TenantBatch([r % args.tenants for r in range(n_rows)])
            with torch.no_grad():
                y0 = base(x)
                outs = {k: layer(x, batch) for k, layer in layers.items()}
                ref = (outs["torch"] - y0).float()
                for k in ("triton", "cached"):
                    err = ((outs[k] - y0).float() - ref).norm() / ref.norm().clamp_min(1e-30)
                    if err > 2e-2:
                        sys.exit(f"{name} R={n_rows}: {k} differs from the torch reference (relative error {err:.2e})")
                base_us = measure(lambda: base(x), reps)
                us = {k: max(0.0, measure(lambda: layer(x, batch), reps) - base_us) for k, layer in layers.items()}
                groups = batch.rows(n_rows, device)
                stack = layers["triton"].stacked()
                used = {s for s, _, _ in groups.segments}
                packed_bytes = sum(layers["triton"].tenants[s].nbytes() for s in used)
                bound = packed_bytes / bw * 1e6
                print(f"{name:>18} {n_rows:>3} | {us['triton']:>9.1f} {us['torch']:>9.1f} {us['cached']:>9.1f} | "
                      f"{packed_bytes / 1024:>10.1f} {bound:>8.2f} {us['triton'] / bound:>11.1f}x", flush=True)
                if args.sweep:
                    for cfg in SWEEP[:2] if args.smoke else SWEEP:
                        blocks = KernelBlocks(*cfg)
                        yy = y0.clone()
                        add_deltas(x, yy, groups, stack, blocks)
                        if ((yy - y0).float() - ref).norm() > 2e-2 * ref.norm():
                            sys.exit(f"blocks {cfg}: wrong result")
                        t = measure(lambda: add_deltas(x, y0.clone(), groups, stack, blocks), reps)
                        sweep_rows.append((name, n_rows, cfg, t))
    if sweep_rows:
        print(f"\n{'linear':>18} {'R':>3} | tile sizes m,r,k,n → µs (incl. a clone of y)")
        for key in dict.fromkeys((n, r) for n, r, _, _ in sweep_rows):
            cells = "  ".join(f"{','.join(map(str, c))}: {t:.1f}" for n, r, c, t in sweep_rows if (n, r) == key)
            print(f"{key[0]:>18} {key[1]:>3} | {cells}")
    print("\nratio: triton time / (packed bytes / copy bandwidth), per row above; target on a GPU ≤ 2")
    return 0


if __name__ == "__main__":
    sys.exit(main())
