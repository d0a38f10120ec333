"""Benchmark on a real pair: SmolLM2-135M-Instruct (base) and its full fine-tune on a generated task.

Build the pair first (benchmarks/real_pair.py build --out DIR). Then:

    python benchmarks/bench_real_pair.py --pair /work/pairs/smollm2-arith

For α ∈ {1/16, 1/32} and the four methods: compress (wall time and peak RSS of the compress process),
the paper's Table 7 (Eq. 1 layer-wise error on held-out text, low/mid/high thirds, All and Out = top
1 % activations), task accuracy of each merged model beside base and fine-tune, and the file size.
Prints one table; writes results.json beside the deltas. Not run in CI (minutes to hours on CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from real_pair import load_model, task_accuracy  # noqa: E402

from prinmix import api  # noqa: E402
from prinmix.algorithms.methods import METHOD_NAMES  # noqa: E402
from prinmix.evaluate.layer_error import layer_errors  # noqa: E402


def compress_measured(base, ft, out, ratio, method, nsamples, seqlen) -> dict:
    """Run `prinmix compress` in a child process; wall seconds and the child's peak RSS (GiB)."""
    cmd = [sys.executable, "-m", "prinmix.cli", "compress", str(base), str(ft), "-o", str(out), "--ratio", ratio,
           "--method", method, "--nsamples", str(nsamples), "--seqlen", str(seqlen), "--no-resume"]
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.time() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"compress failed: {' '.join(cmd)}")
    return {"seconds": seconds, "peak_rss_gib": usage.ru_maxrss / 1024 ** 2}


def lowest_error_counts(records, runs) -> list[str]:
    """Per ratio: how many linears, and how many decoder layers (sum of the layer's Eq. 1 SSE), each
    method has the lowest error on. records: LinearError (or their dicts); runs: the benchmark's runs."""
    get = (lambda r, k: r[k]) if records and isinstance(records[0], dict) else getattr
    lines = []
    for ratio in dict.fromkeys(r["ratio"] for r in runs):
        labels = {r["label"]: r["method"] for r in runs if r["ratio"] == ratio}
        sse: dict[str, dict[str, float]] = {}
        layer_sse: dict[int, dict[str, float]] = {}
        for rec in records:
            label = get(rec, "delta")
            if label in labels:
                sse.setdefault(get(rec, "name"), {})[label] = get(rec, "sse")
                per_layer = layer_sse.setdefault(get(rec, "layer"), {})
                per_layer[label] = per_layer.get(label, 0.0) + get(rec, "sse")
        wins = {m: [0, 0] for m in labels.values()}
        for by_label in sse.values():
            wins[labels[min(by_label, key=by_label.get)]][0] += 1
        for by_label in layer_sse.values():
            wins[labels[min(by_label, key=by_label.get)]][1] += 1
        lines.append(f"α={ratio}: lowest Eq. 1 error in " + ", ".join(
            f"{m} {w[0]}/{len(sse)} linears {w[1]}/{len(layer_sse)} layers" for m, w in wins.items()))
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pair", required=True, help="directory with base/, finetuned/ and task_test.jsonl")
    p.add_argument("--out", default=None, help="where deltas and results go (default PAIR/bench)")
    p.add_argument("--ratios", default="1/16,1/32")
    p.add_argument("--methods", default=",".join(METHOD_NAMES))
    p.add_argument("--nsamples", type=int, default=32, help="calibration sequences for compression")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-nsamples", type=int, default=8, help="held-out sequences for the layer error")
    p.add_argument("--eval-seqlen", type=int, default=512)
    p.add_argument("--task-limit", type=int, default=200)
    p.add_argument("--reuse", action="store_true", help="reuse deltas already in --out")
    a = p.parse_args(argv)

    pair = Path(a.pair)
    base, ft, task = pair / "base", pair / "finetuned", pair / "task_test.jsonl"
    out = Path(a.out) if a.out else pair / "bench"
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    for ratio in a.ratios.split(","):
        for method in a.methods.split(","):
            if method == "bitdelta" and eval(ratio.replace("x", "")) < 1 / 16:  # noqa: S307 - "1/32" style
                continue
            delta = out / f"{method}-{ratio.replace('/', 'over')}.delta"
            meas = {"seconds": None, "peak_rss_gib": None}
            if not (a.reuse and delta.exists()):
                print(f"compress {method} at {ratio} …", flush=True)
                meas = compress_measured(base, ft, delta, ratio, method, a.nsamples, a.seqlen)
            info = api.info(delta)
            runs.append({"label": delta.stem, "method": method, "ratio": ratio, "delta": str(delta),
                         "file_mib": info.file_bytes / 2 ** 20, "linear_ratio": info.ratio_achieved, **meas})

    print("layer-wise error (Eq. 1) on held-out text …", flush=True)
    errors = layer_errors(base, ft, {r["label"]: r["delta"] for r in runs}, nsamples=a.eval_nsamples,
                          seqlen=a.eval_seqlen)
    summary = errors.summary()

    print("task accuracy …", flush=True)
    acc = {}
    for name, path in (("base", base), ("fine-tune", ft)):
        acc[name] = task_accuracy(*load_model(path), task, limit=a.task_limit)
    for r in runs:
        with tempfile.TemporaryDirectory() as tmp:
            merged = api.merge(base, r["delta"], Path(tmp) / "merged")
            r["accuracy"] = task_accuracy(*load_model(merged), task, limit=a.task_limit)

    cols = ["low", "mid", "high"]
    head = (f"{'method':<10} {'α':>5} {'file MiB':>8} {'lin.ratio':>9} {'time s':>7} {'RSS GiB':>7} "
            + " ".join(f"{g + ' All':>9} {g + ' Out':>9}" for g in cols) + f" {'rel.err':>8} {'acc':>6}")
    print()
    print(f"pair: {pair}  (errors ×1e2 as in the paper's Table 7; rel.err = ΣE²/Σ(ΔWX)² over all linears)")
    print(head)
    print(f"{'base':<10} {'':>5} {'':>8} {'':>9} {'':>7} {'':>7} " + " ".join(f"{'':>9} {'':>9}" for _ in cols)
          + f" {'':>8} {acc['base']:>6.3f}")
    print(f"{'fine-tune':<10} {'':>5} {'':>8} {'':>9} {'':>7} {'':>7} " + " ".join(f"{'':>9} {'':>9}" for _ in cols)
          + f" {'':>8} {acc['fine-tune']:>6.3f}")
    fmt = lambda v, w: f"{v:>{w}.3g}" if v is not None else f"{'-':>{w}}"  # noqa: E731
    for r in runs:
        s = summary[r["label"]]
        errs = " ".join(f"{fmt(100 * s[g]['all'], 9)} {fmt(100 * s[g]['out'], 9)}" for g in cols)
        print(f"{r['method']:<10} {r['ratio']:>5} {r['file_mib']:>8.2f} {r['linear_ratio']:>9.5f} "
              f"{fmt(r['seconds'], 7)} {fmt(r['peak_rss_gib'], 7)} {errs} {fmt(s['all']['rel'], 8)} "
              f"{r['accuracy']:>6.3f}")
    print()
    for line in lowest_error_counts(errors.records, runs):
        print(line)
    (out / "results.json").write_text(json.dumps({"runs": runs, "accuracy": acc, "layer_errors": errors.to_dict()},
                                                 indent=1, default=float))
    print(f"\nwrote {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
