"""The fused packed kernel's code paths (runtime/packed_kernel.py ISA_LEVELS) side by side on a real delta: the
choice of the default path rests on this table.

N tenants, each its own copy of a delta file's linears of some layers (q, k, v, o, gate, up, down) and of its
lm_head / embedding rows delta (unless --no-vocab), --rows activation rows each (1: a decode step), the kernel called once per linear as in a
serving step. For each activation dtype (bfloat16: the served SmolLM2 checkpoints; float32) and each code path
this CPU runs, printed: ms for the linears and for the vocabulary rows (fastest of --reps), codes read per ns,
and the ratio against the AVX-512BW path ("avx512", the kernel before VBMI / BF16) measured in the same run.

    python benchmarks/bench_packed_kernel.py --delta FILE [--tenants 32] [--rows 1] [--threads 1] [--layers 0,1,2]
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_delta_paths import fastest_ms  # noqa: E402

from prinmix.format.delta_file import load_delta  # noqa: E402
from prinmix.runtime.packed import PackedLinear  # noqa: E402
from prinmix.runtime.packed_kernel import ISA_LEVELS, PackedTable, add_packed_deltas, cpu_isa, kernel_available  # noqa: E402


def tables_for(matrices, n: int) -> list[tuple[PackedTable, int, int]]:
    """(table of n tenants, each its own copy of the delta, h_out, h_in) per matrix."""
    out = []
    for m in matrices:
        p = PackedLinear.from_compressed(m)
        out.append((PackedTable.build({i: copy.deepcopy(p) for i in range(n)}), p.shape[0], p.shape[1]))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--delta", required=True, help="a PrinMix delta file (e.g. a SmolLM2 whole delta)")
    ap.add_argument("--tenants", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--layers", default="0,1,2")
    ap.add_argument("--rows", type=int, default=1, help="activation rows a tenant (1: decode; more: prefill)")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--no-vocab", dest="vocab", action="store_false", help="leave out the vocabulary rows delta")
    args = ap.parse_args(argv)
    if not kernel_available():
        print("the packed kernel is not available here")
        return 1
    torch.set_num_threads(args.threads)
    n = args.tenants
    delta = load_delta(args.delta)
    layers = {int(v) for v in args.layers.split(",")}
    linears = [m for name, m in delta.matrices.items()
               if name.startswith("model.layers.") and int(name.split(".")[2]) in layers]
    parts = {"linears": tables_for(linears, n)}
    if args.vocab and delta.vocab:
        parts["vocab rows"] = tables_for([m for _, m, _ in delta.vocab.values()], n)
    rows = args.rows
    # codes read a call: the kernel reads each tenant's codes once per tile of up to 4 rows (ROWS in the C++)
    codes = {part: n * -(-rows // 4) * sum(t.max_rank * (o + i) for t, o, i in tabs) for part, tabs in parts.items()}
    order, segments = torch.arange(n * rows), [(i * rows, rows, i) for i in range(n)]
    g = torch.Generator().manual_seed(0)
    levels = ISA_LEVELS[1:ISA_LEVELS.index(cpu_isa()) + 1]
    results = {}                                    # (dtype, part, isa) -> ms
    for dtype in (torch.bfloat16, torch.float32):
        for part, tabs in parts.items():
            xs = [torch.randn(n * rows, i, generator=g).to(dtype) for _, _, i in tabs]
            ys = [torch.zeros(n * rows, o, dtype=dtype) for _, o, _ in tabs]
            for isa in levels:
                def run():
                    for (t, _, _), x, y in zip(tabs, xs, ys):
                        add_packed_deltas(x, y, order, segments, t, isa=isa)
                results[dtype, part, isa] = fastest_ms(run, args.reps)
    print(f"{args.delta}: layers {sorted(layers)} ({len(linears)} linears){' + vocabulary rows' if 'vocab rows' in parts else ''}, "
          f"{n} tenants x {rows} rows, {args.threads} threads, CPU runs up to '{cpu_isa()}'\n")
    head = f"{'x dtype':>9} | {'part':>10} | {'path':>7} | {'ms':>8} {'codes/ns':>8} {'vs avx512':>9}"
    print(head)
    print("-" * len(head))
    for (dtype, part, isa), ms in results.items():
        ref = results[dtype, part, "avx512"]
        print(f"{str(dtype).split('.')[-1]:>9} | {part:>10} | {isa:>7} | {ms:>8.2f} {codes[part] / ms / 1e6:>8.2f} "
              f"{ref / ms:>8.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
