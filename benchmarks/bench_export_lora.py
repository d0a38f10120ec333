"""Where `prinmix export-lora`'s time goes, and what reading compressed vocabulary rows as factors saves.

Stages, each timed in this run on one delta (a whole fine-tune: linears, norms, embedding / lm_head rows):
    read             CheckpointReader(base) + load_delta
    module deltas    collect_module_deltas: the linears' factors, norm folds (one SVD of the factors per
                     folded module), the embedding / lm_head factors
      of which vocabulary factors, from the stored factors   (row_delta_factors: what export does)
      reference: dense float64 SVD of E_ft − E_base          (factors_of_rows: what export did before)
    export_lora, no check   the whole export (truncation, write) without the whole-model check
    whole-model check       export_lora's check (base, merge, base + adapter in PEFT, fine-tune: 4 model loads)
The exactness of the factor path is checked in the same run: ‖L·R − ΔE_ref‖_F / ‖ΔE_ref‖_F against the float64
dense difference ΔE_ref = E_ft − E_base, where E_ft is rebuilt row by row in float64 from the stored factors
(the dense SVD path sees float32 rounding of base + ΔŴ as extra ranks; its rank is printed beside).

    python benchmarks/bench_export_lora.py --base /work/pairs/smollm2-arith/base \\
        --delta prinmix-whole-1_16.delta --finetuned /work/pairs/smollm2-arith/finetuned
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import tempfile
import time
from pathlib import Path

import torch

from prinmix.checkpoint.apply_delta import finetuned_tensor
from prinmix.checkpoint.reader import CheckpointReader
from prinmix.export.lora import EMBEDDING, collect_module_deltas, export_lora, factors_of_rows, row_delta_factors
from prinmix.format.delta_file import load_delta


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True)
    p.add_argument("--delta", required=True)
    p.add_argument("--finetuned", default=None, help="also compared by the whole-model check")
    p.add_argument("--max-rank", type=int, default=512)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--profile", type=int, default=0, help="print the N costliest functions of the no-check export")
    p.add_argument("--skip-check", action="store_true", help="do not time the whole-model check")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    (base, delta), t_read = timed(lambda: (CheckpointReader(a.base), load_delta(a.delta)))
    (modules, _), t_modules = timed(lambda: collect_module_deltas(base, delta, a.delta))
    (left, right), t_factors = timed(lambda: row_delta_factors(EMBEDDING, base, delta))
    (u_s, vh), t_dense = timed(lambda: factors_of_rows(finetuned_tensor(EMBEDDING, base, delta, torch.float64)
                                                       - base.get(EMBEDDING, torch.float64)))
    rows = []
    if EMBEDDING in delta.vocab:
        idx, m, shape = delta.vocab[EMBEDDING]
        ref = torch.zeros(shape, dtype=torch.float64)
        ref[idx] = m.reconstruct(torch.float64)
        for what, (lf, rf) in (("stored factors", (left, right)), ("dense SVD", (u_s, vh))):
            rows.append((what, lf.shape[1], float((lf @ rf - ref).norm() / ref.norm())))
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        profile = cProfile.Profile()
        profile.enable()
        report, t_export = timed(lambda: export_lora(a.base, a.delta, Path(tmp) / "a", max_rank=a.max_rank,
                                                     dtype=torch.float32, check=False))
        profile.disable()
        t_check = None
        if not a.skip_check:
            checked, t_full = timed(lambda: export_lora(a.base, a.delta, Path(tmp) / "b", max_rank=a.max_rank,
                                                        dtype=torch.float32, finetuned=a.finetuned))
            t_check = t_full - t_export
    print(f"export-lora of {a.delta} ({len(modules)} modules, r = {report['r']}, --max-rank {a.max_rank}, "
          f"{report['adapter_bytes'] / 2**20:.0f} MiB fp32), {a.threads} threads")
    print(f"{'stage':<56} {'seconds':>8} {'vs dense SVD':>13}")
    table = [("read base + delta", t_read), ("module deltas (collect_module_deltas)", t_modules),
             ("  vocabulary factors from the stored factors", t_factors),
             ("  reference: dense float64 SVD of E_ft - E_base", t_dense),
             ("export_lora without the whole-model check", t_export)]
    if t_check is not None:
        table.append(("whole-model check (4 model loads, 512 tokens)", t_check))
    for what, t in table:
        print(f"{what:<56} {t:>8.2f} {t / t_dense:>12.2f}x")
    print(f"per-module relative Frobenius error: truncation {report['truncation_rel_error']:.3g}, "
          f"with float32 factors {report['rel_error']:.3g}")
    if t_check is not None:
        for what, figures in checked["whole_model"].items():
            if isinstance(figures, dict):
                print(f"whole model, {what}: " + ", ".join(f"{k} {v:.4g}" for k, v in figures.items()))
    if a.profile:
        print("\nexport_lora without the check, by function (cProfile, cumulative):")
        pstats.Stats(profile).sort_stats("cumulative").print_stats(a.profile)
    for what, rank, err in rows:
        print(f"embedding factors, {what}: rank {rank}, relative error vs float64 dense difference {err:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
