"""Serving N fine-tunes of one base: prinmix batched deltas vs N dense fine-tunes vs the base alone.

N tenants are N copies of one delta registered under different names (each holds its own packed
payload). Every system serves one request per tenant: a random prompt of P tokens, then D greedy
tokens.
    (a) prinmix  MultiTenantModel: base once + N packed deltas, all N requests in ONE batch per step
    (b) naive    N dense merged fine-tunes (prinmix merge), each request run alone (batch 1) on its own copy
    (c) base     the base model alone serving the N requests in one batch (the upper bound)
prinmix runs once per --variants entry (how its CPU delta products run), each measured in the same run:
    packed       the fused C++ kernel on the packed codes (runtime/packed_kernel.py; the CPU default)
    packed1      the same on the calling thread only (PRINMIX_KERNEL_PARALLEL=0)
    int4, int8   the factor cache in that dtype (runtime/factor_cache.py), float32 / bfloat16 likewise
    torch        the reference (unpacks the codes at every step)
    auto         whatever MultiTenantModel picks (with --backend / --factor-cache-dtype)
Each (system, N) runs in a fresh subprocess so its peak RSS is its own. Reported:
    tok/s     N·D generated tokens / (prefill + decode) wall time, fastest of --repeat runs;
              decode tok/s: N·(D−1) / decode time
    state     weights + resident deltas + factor cache + KV cache in bytes (exact accounting); for naive, N dense
              copies (only min(N, --naive-copies) are really loaded; the rest are counted, marked *)
    peak RSS  measured, whole process (includes ~0.3–0.5 GB of torch/transformers)

    python benchmarks/bench_serving.py                                # tiny llama pair, P=32, D=16
    python benchmarks/bench_serving.py --base DIR --finetuned DIR     # compresses a real pair (prinmix, 1/8)
    python benchmarks/bench_serving.py --base DIR --delta FILE --prefill 512 --decode 128
    python benchmarks/bench_serving.py --base DIR --delta FILE --variants packed,int4,int8
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

SYSTEMS = ("prinmix", "naive", "base")
CACHE_DTYPES = ("int4", "int8", "float32", "bfloat16")
VARIANTS = ("auto", "packed", "packed1", "torch") + CACHE_DTYPES


def variant_config(variant: str, args) -> tuple[str, str]:
    """(DeltaLinear backend, factor cache dtype) of a --variants entry."""
    if variant in CACHE_DTYPES:
        return "cached", variant
    if variant == "packed1":
        return "packed", args.factor_cache_dtype
    return (args.backend if variant == "auto" else variant), args.factor_cache_dtype


# ---- one measurement (subprocess) -------------------------------------------------------------------

def _prompts(n: int, length: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, vocab, (length,), generator=g).tolist() for _ in range(n)]


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _dense_request(model, prompt: list[int], n_new: int, device) -> tuple[float, float]:
    """Greedy generation of one request alone on a dense model: (prefill s, decode s)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    t0 = time.perf_counter()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt], device=device), use_cache=True, logits_to_keep=1,
                       **{key: cache}).logits
        tok = logits[:, -1].argmax(-1, keepdim=True)
        t1 = time.perf_counter()
        for _ in range(n_new - 1):
            logits = model(input_ids=tok, use_cache=True, **{key: cache}).logits
            tok = logits[:, -1].argmax(-1, keepdim=True)
    return t1 - t0, time.perf_counter() - t1


def worker(cfg: dict) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM

    from prinmix.runtime.multi_tenant import MultiTenantModel

    torch.set_num_threads(cfg["threads"])
    device, n, p_len, d_len = torch.device(cfg["device"]), cfg["n"], cfg["prefill"], cfg["decode"]
    dtype = getattr(torch, cfg["dtype"]) if cfg["dtype"] else None
    vocab = AutoConfig.from_pretrained(cfg["base"]).get_text_config().vocab_size
    prompts = _prompts(n, p_len, vocab)
    out = {"system": cfg["system"], "n": n}
    if cfg["system"] == "naive":
        copies = [AutoModelForCausalLM.from_pretrained(cfg["merged"], dtype=dtype or "auto").to(device).eval()
                  for _ in range(min(n, cfg["naive_copies"]))]
        _dense_request(copies[0], prompts[0][:4], 2, device)                     # warm-up
        runs = []
        for _ in range(cfg["repeat"]):
            prefill = decode = 0.0
            for i, prompt in enumerate(prompts):
                a, b = _dense_request(copies[i % len(copies)], prompt, d_len, device)
                prefill, decode = prefill + a, decode + b
            runs.append((prefill, decode))
        prefill, decode = min(runs, key=sum)
        weights = _nbytes(copies[0].parameters())
        kv = _kv_bytes_per_token(copies[0]) * (p_len + d_len)                       # one request at a time
        out.update(state_bytes=n * weights + kv, loaded_copies=len(copies))
    else:
        model = MultiTenantModel(cfg["base"], device=device, dtype=dtype, backend=cfg["backend"],
                                 factor_cache_bytes=cfg["cache_mib"] << 20,
                                 factor_cache_dtype=getattr(torch, cfg["cache_dtype"]))
        tenants = [None] * n
        if cfg["system"] == "prinmix":
            tenants = [f"tenant{i}" for i in range(n)]
            for t in tenants:
                model.add_tenant(t, cfg["delta"])
        model.generate(prompts[:1], tenants[:1], 2)                                 # warm-up
        runs = []
        for _ in range(cfg["repeat"]):
            t0 = time.perf_counter()
            state = model.prefill(prompts, tenants)
            t1 = time.perf_counter()
            for _ in range(d_len - 1):
                model.decode_step(state)
            runs.append((t1 - t0, time.perf_counter() - t1))
        prefill, decode = min(runs, key=sum)
        mem = model.memory()
        out.update(state_bytes=sum(mem.values()) + state.kv_bytes(), delta_bytes=mem["delta_bytes"],
                   cache_bytes=mem["factor_cache_bytes"])
    out.update(prefill_s=prefill, decode_s=decode, tok_s=n * d_len / (prefill + decode),
               decode_tok_s=n * (d_len - 1) / decode if d_len > 1 else float("nan"),
               peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    if device.type == "cuda":
        out["peak_cuda"] = torch.cuda.max_memory_allocated(device)
    return out


def _kv_bytes_per_token(model) -> int:
    """K + V bytes per token of one sequence, all layers."""
    c = model.config.get_text_config()
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    return 2 * c.num_hidden_layers * kv_heads * head_dim * next(model.parameters()).element_size()


# ---- orchestration -------------------------------------------------------------------------------

def prepare(args) -> tuple[Path, Path, Path]:
    """(base dir, delta file, merged fine-tune dir), building and caching what is missing."""
    from prinmix import api
    from prinmix.api import CalibrationConfig

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    if args.base:
        base, ft = Path(args.base), Path(args.finetuned) if args.finetuned else None
    else:
        from prinmix.tiny_models import TinyModelFactory

        base, ft = TinyModelFactory(work / "tiny").pair("llama")
    delta = Path(args.delta) if args.delta else work / f"{base.parent.name}-{args.method}.delta"
    if not delta.exists():
        if ft is None:
            sys.exit("--base needs --delta or --finetuned")
        print(f"compressing {ft} against {base} ({args.method}, ratio {args.ratio}) -> {delta}", file=sys.stderr)
        api.compress(base, ft, delta, ratio=args.ratio, method=args.method, device="cpu", calibration=CalibrationConfig(nsamples=args.nsamples, seqlen=args.seqlen))
    merged = work / f"{delta.stem}-merged"
    if not (merged / "config.json").exists():
        api.merge(base, delta, merged, overwrite=True)
    return base, delta, merged


def add_pair_arguments(p: argparse.ArgumentParser, ratio: str) -> None:
    """The options prepare() reads: which pair / delta, how to compress it, where to keep what it builds."""
    p.add_argument("--base", help="base checkpoint dir (default: the tiny llama pair, built locally)")
    p.add_argument("--finetuned", help="fine-tune dir, compressed when --delta is not given")
    p.add_argument("--delta", help="a prinmix delta file of --base")
    p.add_argument("--method", default="prinmix")
    p.add_argument("--ratio", default=ratio)
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--workdir", default=os.environ.get("PRINMIX_BENCH_DIR", "/tmp/prinmix-bench"))


def run(system: str, n: int, args, base, delta, merged, variant: str = "auto") -> dict:
    backend, cache_dtype = variant_config(variant, args)
    cfg = {"system": system, "n": n, "base": str(base), "delta": str(delta), "merged": str(merged),
           "prefill": args.prefill, "decode": args.decode, "device": args.device, "dtype": args.dtype,
           "backend": backend, "threads": args.threads, "naive_copies": args.naive_copies,
           "repeat": args.repeat, "cache_mib": args.factor_cache_mib, "cache_dtype": cache_dtype}
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if variant == "packed1":
        env["PRINMIX_KERNEL_PARALLEL"] = "0"
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(cfg)], capture_output=True, text=True,
                          env=env)
    if proc.returncode:
        sys.exit(f"{system} N={n} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _mb(n: float) -> str:
    return f"{n / 2 ** 20:.1f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_pair_arguments(p, ratio="1/8")
    p.add_argument("--tenants", default="1,2,4,8,16,32")
    p.add_argument("--prefill", type=int, default=32, help="prompt tokens per request (512 on a GPU)")
    p.add_argument("--decode", type=int, default=16, help="generated tokens per request (128 on a GPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: the checkpoint's)")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "packed", "cached", "triton"])
    p.add_argument("--variants", default="auto",
                   help=f"prinmix configurations to measure in the same run, comma-separated: {', '.join(VARIANTS)}")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--repeat", type=int, default=3, help="timed runs per measurement; the fastest counts")
    p.add_argument("--naive-copies", type=int, default=8, help="dense copies really loaded for (b)")
    p.add_argument("--factor-cache-mib", type=int, default=1024,
                   help="prinmix: byte budget of the unpacked factors of the hottest tenants (0 = none)")
    p.add_argument("--factor-cache-dtype", default="int4", choices=["int4", "int8", "float32", "bfloat16"],
                   help="prinmix: how the factor cache keeps them (runtime/factor_cache.py)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0

    variants = args.variants.split(",")
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        p.error(f"unknown variant {bad[0]!r}: choose from {', '.join(VARIANTS)}")
    base, delta, merged = prepare(args)
    ns = [int(x) for x in args.tenants.split(",")]
    print(f"base {base}\ndelta {delta} ({delta.stat().st_size} bytes)\nP = {args.prefill}, D = {args.decode}, "
          f"device {args.device}, dtype {args.dtype or 'checkpoint'}, prinmix variants {','.join(variants)}, factor "
          f"cache {args.factor_cache_mib} MiB, {args.threads} threads, best of {args.repeat}, load average "
          f"{os.getloadavg()[0]:.1f}\n")
    head = (f"{'N':>3} {'prinmix':>7} | {'prinmix tok/s':>13} {'naive tok/s':>11} {'base tok/s':>10} | {'vs naive':>8} "
            f"{'vs base':>7} | {'decode tok/s p/n/b':>20} | {'state MiB p/n/b':>22} | {'peak RSS MiB p/n/b':>20}")
    print(head)
    print("-" * len(head))
    targets = []
    for n in ns:
        r = {s: run(s, n, args, base, delta, merged) for s in SYSTEMS[1:]}
        for variant in variants:
            r["prinmix"] = run("prinmix", n, args, base, delta, merged, variant)
            dec = {s: r[s]["decode_tok_s"] for s in SYSTEMS}
            targets.append((n, variant, dec["prinmix"] / dec["naive"], dec["prinmix"] / dec["base"],
                            r["prinmix"]["delta_bytes"] / n, r["prinmix"]["cache_bytes"]))
            star = "*" if r["naive"]["loaded_copies"] < n else " "
            dec = "/".join(f"{r[s]['decode_tok_s']:.0f}" for s in SYSTEMS)
            state = (f"{_mb(r['prinmix']['state_bytes'])}/{_mb(r['naive']['state_bytes'])}{star}/"
                     f"{_mb(r['base']['state_bytes'])}")
            rss = "/".join(_mb(r[s]["peak_rss"]) for s in SYSTEMS)
            print(f"{n:>3} {variant:>7} | {r['prinmix']['tok_s']:>13.1f} {r['naive']['tok_s']:>11.1f} "
                  f"{r['base']['tok_s']:>10.1f} | {r['prinmix']['tok_s'] / r['naive']['tok_s']:>7.2f}x "
                  f"{r['prinmix']['tok_s'] / r['base']['tok_s']:>6.2f}x | {dec:>20} | {state:>22} | {rss:>20}",
                  flush=True)
    print(f"\nratios: prinmix tok/s over naive / base tok/s, same run; load average at the end "
          f"{os.getloadavg()[0]:.1f}")
    file_mib = delta.stat().st_size / 2 ** 20
    for n, variant, vs_naive, vs_base, per_tenant, cache in targets:
        print(f"target N={n} ({variant}): prinmix decode {vs_naive:.2f}x naive (>= 2), {vs_base:.2f}x base (>= 0.4); "
              f"memory per extra tenant {per_tenant / 2 ** 20:.1f} MiB packed + {cache / n / 2 ** 20:.1f} MiB "
              f"factor cache = {(per_tenant + cache / n) / 2 ** 20:.1f} MiB against a {file_mib:.1f} MiB delta file "
              f"(cache {cache / 2 ** 20:.0f} MiB in all, budget {args.factor_cache_mib} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
