"""The options for the CPU delta products of a decode step, measured side by side (the choice of the
fast path in runtime/factor_cache.py rests on this table).

One decoder layer of SmolLM2-135M (q, k, v, o, gate, up, down: hidden 576, MLP 1536), N tenants with
one decode row each, every delta a PrinMix 1/16 compression of a synthetic ΔW (rank-64 part with a
decaying spectrum plus noise: widths 3–7 within each matrix). Options, each computing x·ΔŴᵀ for
every (tenant, linear):

    packed      the torch reference: one product per width block, codes unpacked at every call
    f32 GEMMs   dequantised factors cached in float32, two GEMMs per (tenant, linear)
    bf16 GEMMs  the same in bfloat16 (half the cache bytes)
    int8 GEMMs  the codes minus zero points cached in int8, two weight-only int8 GEMMs (bfloat16
                activations) per (tenant, linear) (runtime/factor_cache.py Int8Factors)
    int4 GEMMs  the same codes split into [−8, 7] parts in torch's CPU int4 GEMM, an int8 remainder or
                int8 where int4 is not smaller (Int4Factors; `int4 linears` counts those in int4)
    C++ kernel  the fused unpack-and-multiply kernel on the packed codes, all tenants of a linear in one
                call (runtime/packed_kernel.py)  ← chosen (the CPU default when it builds)
                (int8 / int4 / C++ kernel rows: every tenant its own copy of its data, read from memory as
                in serving; the float rows share one copy)
    bmm         all tenants' factors pre-stacked [N, r_max, h] (zero-padded), two bmm per linear
    bmm+stack   the same, stacking the tenants' factors at every call
    compiled    --compile: the unpack-and-multiply of one block through torch.compile (inductor)

Printed: ms per layer (fastest of --reps), the ratio against packed, and the bytes each option keeps
per tenant and layer against the packed bytes.

    python benchmarks/bench_delta_paths.py [--tenants 8] [--threads 1] [--compile]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import synthetic_delta  # noqa: E402

from prinmix.algorithms.compress_matrix import compress_matrix  # noqa: E402
from prinmix.runtime.delta_linear import DeltaLinear  # noqa: E402
from prinmix.runtime.factor_cache import Int4Factors, dense_factors, int4_factors, int8_factors  # noqa: E402
from prinmix.runtime.packed import PackedLinear, unpack_fast  # noqa: E402
from prinmix.runtime.packed_kernel import PackedTable, add_packed_deltas, kernel_available  # noqa: E402

SMOLLM2_LAYER = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]


def fastest_ms(fn, reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def _stacked(factors: list, n: int, dtype):
    """[n, r_max, h_in] and [n, r_max, h_out] zero-padded stacks of one linear's factors."""
    r = max(f.a.shape[0] for f in factors)
    a = torch.zeros(n, r, factors[0].a.shape[1], dtype=dtype)
    b = torch.zeros(n, r, factors[0].b.shape[1], dtype=dtype)
    for i in range(n):
        f = factors[i % len(factors)]
        a[i, :f.a.shape[0]], b[i, :f.b.shape[0]] = f.a, f.b
    return a, b


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tenants", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--compile", action="store_true", help="also time torch.compile of the unpack-and-multiply")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    n = args.tenants
    compressed = [compress_matrix(synthetic_delta(o, i, k, "cpu"), None, 1 / 16, "prinmix")
                  for k, (o, i) in enumerate(SMOLLM2_LAYER)]
    packs = [PackedLinear.from_compressed(m) for m in compressed]
    xs = [torch.randn(1, i) for _, i in SMOLLM2_LAYER]
    packed_bytes = sum(q.resident_bytes for q in packs)
    ref = DeltaLinear(torch.nn.Linear(1, 1), backend="torch")
    rows = []

    def run_packed():
        for _ in range(n):
            for q, x in zip(packs, xs):
                ref._delta_rows(q, x)
    rows.append(("packed", fastest_ms(run_packed, args.reps), packed_bytes))
    for dtype, name in ((torch.float32, "f32 GEMMs"), (torch.bfloat16, "bf16 GEMMs")):
        factors = [dense_factors(q, dtype) for q in packs]
        xd = [x.to(dtype) for x in xs]

        def run_gemms():
            for _ in range(n):
                for f, x in zip(factors, xd):
                    f.apply(x)
        rows.append((name, fastest_ms(run_gemms, args.reps), sum(f.nbytes() for f in factors)))
    x8 = [x.bfloat16() for x in xs]
    for name, build in (("int8 GEMMs", int8_factors), ("int4 GEMMs", lambda q: int4_factors(q) or int8_factors(q))):
        per_tenant = [[build(q) for q in packs] for _ in range(n)]

        def run_integer():
            for factors in per_tenant:
                for f, x in zip(factors, x8):
                    f.apply(x)
        rows.append((name, fastest_ms(run_integer, args.reps), sum(f.nbytes() for f in per_tenant[0])))
    int4_linears = sum(isinstance(f, Int4Factors) for f in per_tenant[0])
    if kernel_available():
        tables = [PackedTable.build({i: PackedLinear.from_compressed(m) for i in range(n)}) for m in compressed]
        xk = [torch.randn(n, i) for _, i in SMOLLM2_LAYER]
        yk = [torch.zeros(n, o) for o, _ in SMOLLM2_LAYER]
        order, segments = torch.arange(n), [(i, 1, i) for i in range(n)]

        def run_kernel():
            for t, x, y in zip(tables, xk, yk):
                add_packed_deltas(x, y, order, segments, t)
        rows.append(("C++ kernel", fastest_ms(run_kernel, args.reps), packed_bytes))
    factors = [dense_factors(q) for q in packs]
    stacks = [_stacked([f], n, torch.float32) for f in factors]
    xb = [torch.randn(n, 1, i) for _, i in SMOLLM2_LAYER]

    def run_bmm():
        for (a, b), x in zip(stacks, xb):
            torch.bmm(torch.bmm(x, a.transpose(1, 2)), b)

    def run_bmm_stack():
        for f, x in zip(factors, xb):
            a, b = torch.stack([f.a] * n), torch.stack([f.b] * n)
            torch.bmm(torch.bmm(x, a.transpose(1, 2)), b)
    rows.append(("bmm", fastest_ms(run_bmm, args.reps), sum(a.numel() + b.numel() for a, b in stacks) * 4 // n))
    rows.append(("bmm+stack", fastest_ms(run_bmm_stack, args.reps), sum(f.nbytes() for f in factors)))
    if args.compile:
        def shrink(x, data, scale, zero, rows: int, cols: int, bits: int):
            codes = unpack_fast(data, bits, rows * cols).view(rows, cols).to(torch.float32)
            return (x @ codes.T - x.sum(-1, keepdim=True) * zero.T) * scale.T
        compiled = torch.compile(shrink, dynamic=False)
        blocks = [(b, x) for q, x in zip(packs, xs) for b in q.blocks if b.v.fused_rows()]
        t0 = time.perf_counter()
        for b, x in blocks:
            s, z = b.v.row_params()
            compiled(x, b.v.data, s, z, b.v.rows, b.v.cols, b.bits)
        compile_s = time.perf_counter() - t0

        def run_compiled():
            for _ in range(n):
                for b, x in blocks:
                    s, z = b.v.row_params()
                    compiled(x, b.v.data, s, z, b.v.rows, b.v.cols, b.bits)

        def run_eager():
            for _ in range(n):
                for b, x in blocks:
                    s, z = b.v.row_params()
                    shrink(x, b.v.data, s, z, b.v.rows, b.v.cols, b.bits)
        eager = fastest_ms(run_eager, args.reps)
        comp = fastest_ms(run_compiled, args.reps)
        print(f"torch.compile of the V̂ shrink of {len(blocks)} blocks: compile {compile_s:.0f} s; "
              f"{comp:.2f} ms vs eager {eager:.2f} ms ({eager / comp:.2f}x)\n")
    print(f"one SmolLM2 layer (7 linears), {n} tenants x 1 decode row, {args.threads} threads; "
          f"ranks {[q.rank for q in packs]}, widths {sorted({b.bits for q in packs for b in q.blocks})}, "
          f"int4 linears {int4_linears} of {len(packs)}\n")
    head = f"{'option':>10} | {'ms / layer':>10} {'vs packed':>9} | {'KiB / tenant':>12} {'x packed':>8}"
    print(head)
    print("-" * len(head))
    for name, ms, nbytes in rows:
        print(f"{name:>10} | {ms:>10.2f} {rows[0][1] / ms:>8.1f}x | {nbytes / 1024:>12.0f} {nbytes / packed_bytes:>7.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
