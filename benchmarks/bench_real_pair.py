"""Benchmark on a real pair: SmolLM2-135M-Instruct (base) and its full fine-tune on a generated task.

Build the pair first (benchmarks/real_pair.py build --out DIR). Then:

    python benchmarks/bench_real_pair.py --pair /work/pairs/smollm2-arith

For α ∈ {1/16, 1/32} and the four methods: compress (wall time and peak RSS of the compress process),
the paper's Table 7 (Eq. 1 layer-wise error on held-out text, low/mid/high thirds, All and Out = top
1 % activations), task accuracy of each merged model beside base and fine-tune, and the file size.
Whole-delta columns: the bytes stored for weights (all parts, with their header entries) and their ratio
to the 16-bit size of everything that differs, the bytes of each part (decoder linears, lm_head,
embedding, exact tensors), and the logit error against the fine-tune on held-out text
(‖z − z_ft‖² / ‖z_ft − z_base‖² over every position, and the mean KL(ft ‖ merged) in nats/token).
`--runs method@ratio[:variant],…` lists runs explicitly: ":exact" = `--exact-embeddings`; derived from the
whole delta of method@ratio without compressing again (CPU is scarce): ":exact-rows" = its linears and norms
with the embedding / lm_head rows stored exactly instead (what exact embeddings cost on top of the same
linears), ":share=S" = compressed with `--vocab-share S` (the embedding / lm_head rows get the share S of
the compressed bits), ":proportional" / ":measured" = compressed with `--split proportional` / `measured`
(no variant: the CLI's default, measured for PrinMix), ":no-vocab" = its linears and norms with the
embedding / lm_head changes dropped (what the file size of the linears buys without the embedding delta).
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
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))

from real_pair import load_model, task_accuracy  # noqa: E402

from prinmix import api  # noqa: E402
from prinmix.algorithms.methods import METHOD_NAMES  # noqa: E402
from prinmix.calibration.data import load_calibration  # noqa: E402
from prinmix.checkpoint.reader import CheckpointReader  # noqa: E402
from prinmix.evaluate.layer_error import HELD_OUT_SEED, layer_errors  # noqa: E402
from prinmix.format.delta_file import save_delta  # noqa: E402


def derive_delta(whole: Path, out: Path, variant: str, base: Path, ft: Path) -> None:
    """A variant of a whole delta (see the module docstring): its vocabulary rows exact, or dropped."""
    delta = api.load_delta(whole)
    ft_r = CheckpointReader(ft)
    for name, (idx, _, shape) in list(delta.vocab.items()):
        if variant == "exact-rows":
            exact = ft_r.get(name, dtype=CheckpointReader(base).dtype(name))
            old = delta.rows.get(name)
            rows = idx if old is None else torch.cat([idx, old[0]])
            delta.rows[name] = (rows, exact[rows].contiguous(), shape)
        del delta.vocab[name]
    delta.params["derived"] = f"{variant} of {whole.name}"
    save_delta(delta, out)


def compress_measured(base, ft, out, ratio, method, nsamples, seqlen, exact_embeddings=False,
                      vocab_share=None, split=None) -> dict:
    """Run `prinmix compress` in a child process; wall seconds and the child's peak RSS (GiB)."""
    cmd = [sys.executable, "-m", "prinmix.cli", "compress", str(base), str(ft), "-o", str(out), "--ratio", ratio,
           "--method", method, "--nsamples", str(nsamples), "--seqlen", str(seqlen), "--no-resume"]
    cmd += ["--exact-embeddings"] if exact_embeddings else []
    cmd += ["--vocab-share", str(vocab_share)] if vocab_share is not None else []
    cmd += ["--split", split] if split else []
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.time() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"compress failed: {' '.join(cmd)}")
    return {"seconds": seconds, "peak_rss_gib": usage.ru_maxrss / 1024 ** 2}


def _logits(path, ids: torch.Tensor) -> torch.Tensor:
    """Logits [n, seq, vocab] float32 of the model at `path` on ids [n, seq], one sequence at a time."""
    model, _ = load_model(path)
    with torch.no_grad():
        return torch.cat([model(input_ids=ids[i:i + 1]).logits.float() for i in range(ids.shape[0])])


def reference_logits(base, ft, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(z_ft, z_base) on ids: computed once for every run's logit_errors."""
    return _logits(ft, ids), _logits(base, ids)


def logit_errors(reference: tuple, merged_dirs: dict, ids: torch.Tensor) -> dict:
    """{label: (relative logit error, mean KL(ft ‖ model) nats/token)} on ids [n, seq] (held-out text);
    reference = reference_logits(base, ft, ids)."""
    z_ft, z_base = reference
    change = float((z_ft - z_base).pow(2).sum())
    logp_ft = torch.log_softmax(z_ft, -1)
    out = {}
    for label, path in merged_dirs.items():
        z = _logits(path, ids)
        kl = float((logp_ft.exp() * (logp_ft - torch.log_softmax(z, -1))).sum(-1).mean())
        out[label] = (float((z - z_ft).pow(2).sum()) / change, kl)
    return out


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
    p.add_argument("--runs", default=None,
                   help="explicit runs, e.g. prinmix@1/16,prinmix@1/16:exact (overrides --ratios/--methods)")
    p.add_argument("--logit-nsamples", type=int, default=4, help="held-out sequences for the logit error")
    a = p.parse_args(argv)

    pair = Path(a.pair)
    base, ft, task = pair / "base", pair / "finetuned", pair / "task_test.jsonl"
    out = Path(a.out) if a.out else pair / "bench"
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    if a.runs:
        plan = []
        for r in a.runs.split(","):
            method, rest = r.split("@")
            ratio, _, variant = rest.partition(":")
            plan.append((method, ratio, variant))
    else:
        plan = [(m, r, "") for r in a.ratios.split(",") for m in a.methods.split(",")]
    for method, ratio, variant in plan:
        if method == "bitdelta" and eval(ratio.replace("x", "")) < 1 / 16:  # noqa: S307 - "1/32" style
            continue
        stem = f"{method}-{ratio.replace('/', 'over')}"
        delta = out / f"{stem}{'-' + variant if variant else ''}.delta"
        exact = variant in ("exact", "exact-rows")
        meas = {"seconds": None, "peak_rss_gib": None}
        if variant in ("exact-rows", "no-vocab"):
            derive_delta(out / f"{stem}.delta", delta, variant, base, ft)
        elif not (a.reuse and delta.exists()):
            print(f"compress {method} at {ratio}{' (exact embeddings)' if exact else ''} …", flush=True)
            share = float(variant.split("=", 1)[1]) if variant.startswith("share=") else None
            meas = compress_measured(base, ft, delta, ratio, method, a.nsamples, a.seqlen, exact, share,
                                     variant if variant in ("measured", "proportional") else None)
        info = api.info(delta)
        w = info.weight_bytes
        vocab = {("lm_head" if "lm_head" in n else "embed"): b for n, b in w["vocab"].items()}
        runs.append({"label": delta.stem, "method": method, "ratio": ratio, "exact_embeddings": exact,
                     "variant": variant,
                     "delta": str(delta), "file_mib": info.file_bytes / 2 ** 20,
                     "linear_ratio": info.ratio_achieved, "whole_ratio": info.ratio_whole,
                     "weight_mib": w["total"] / 2 ** 20, "linear_mib": w["linear"] / 2 ** 20,
                     "lm_head_mib": vocab.get("lm_head", 0) / 2 ** 20, "embed_mib": vocab.get("embed", 0) / 2 ** 20,
                     "exact_mib": w["exact"] / 2 ** 20, **meas})

    print("layer-wise error (Eq. 1) on held-out text …", flush=True)
    errors = layer_errors(base, ft, {r["label"]: r["delta"] for r in runs}, nsamples=a.eval_nsamples,
                          seqlen=a.eval_seqlen)
    summary = errors.summary()

    print("task accuracy and logit error …", flush=True)
    held_out = load_calibration(None, AutoTokenizer.from_pretrained(str(ft)), a.logit_nsamples, a.eval_seqlen,
                                HELD_OUT_SEED)
    reference = reference_logits(base, ft, held_out)
    acc = {}
    for name, path in (("base", base), ("fine-tune", ft)):
        acc[name] = task_accuracy(*load_model(path), task, limit=a.task_limit)
    for r in runs:
        with tempfile.TemporaryDirectory() as tmp:
            merged = api.merge(base, r["delta"], Path(tmp) / "merged")
            r["accuracy"] = task_accuracy(*load_model(merged), task, limit=a.task_limit)
            r["logit_rel"], r["logit_kl"] = logit_errors(reference, {r["label"]: merged}, held_out)[r["label"]]

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
    print("whole delta: bytes stored for weights (MiB, with header entries) / 16-bit size of what differs; parts")
    print(f"{'method':<10} {'α':>5} {'vocab':>7} {'weights':>8} {'whole':>8} {'linears':>8} {'lm_head':>8} "
          f"{'embed':>8} {'exact':>8} {'logit rel':>9} {'KL':>8} {'acc':>6}")
    for r in runs:
        print(f"{r['method']:<10} {r['ratio']:>5} {r['variant'] or 'compr.':>7} "
              f"{r['weight_mib']:>8.2f} {r['whole_ratio']:>8.5f} {r['linear_mib']:>8.2f} {r['lm_head_mib']:>8.2f} "
              f"{r['embed_mib']:>8.2f} {r['exact_mib']:>8.2f} {r['logit_rel']:>9.4f} {r['logit_kl']:>8.4f} "
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
