"""A whole fine-tune exported as a LoRA adapter, served by a real vLLM, against `prinmix merge` and `prinmix serve`.

Part 1 — agreement (issue 14's done-when check). The delta is exported (`prinmix export-lora`, float32,
norms folded, embedding / lm_head deltas, --max-rank R) and served by vLLM (Python API, fp32, greedy);
the same held-out prompts (task JSONL) are decoded greedily by `prinmix merge` of the delta in
transformers. Reported: the fraction of greedy tokens that agree (position by position, all generated
tokens, EOS ignored) and the exact-match task accuracy of both (prinmix.evaluate.tasks' rule).

Part 2 — throughput. R requests (the first R task prompts, D greedy tokens each, EOS ignored), served
    vLLM base       the base alone in vLLM (no LoRA): the reference of the ratios
    vLLM + N LoRA   N exported adapters (copies of one under N names) in one vLLM engine, requests
                    spread round-robin over them, all R in one generate call
    prinmix + N     MultiTenantModel (what `prinmix serve` runs): the base + N packed deltas (copies of
                    the delta), the same R requests round-robin, one batch per step
    prinmix base    MultiTenantModel with no tenant
tok/s = R·D / wall time of the whole batch (prefill + decode), fastest of --repeat runs after a warm-up
(--no-warmup: the first run is timed too).
vLLM runs in its own interpreter (--vllm-python; prinmix does not depend on vllm) via vllm_runner.py.

    python benchmarks/bench_vllm.py --base /work/pairs/smollm2-arith/base \\
        --finetuned /work/pairs/smollm2-arith/finetuned --delta ft.delta \\
        --tasks /work/pairs/smollm2-arith/task_test.jsonl --vllm-python /work/vllm-venv/bin/python
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from prinmix import api
from prinmix.evaluate.tasks import normalise_prediction, read_task_file
from prinmix.export.lora import export_lora
from prinmix.export.vllm_limits import VLLM_MAX_LORA_RANKS
from prinmix.runtime.multi_tenant import MultiTenantModel

RUNNER = Path(__file__).resolve().parent / "vllm_runner.py"


def available_memory_bytes() -> int:
    """MemAvailable of /proc/meminfo (bytes); 0 where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return 0


def vllm_lora_bytes(adapter: Path, max_lora_rank: int) -> int:
    """fp32 bytes one adapter costs a vLLM engine: its loaded copy (the file's tensors) plus its slot in the
    engine's stacked LoRA buffers, which vLLM allocates at max_lora_rank for every module (the file's
    padded rank r → max_lora_rank)."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        file_floats = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    return 4 * file_floats * (1 + max_lora_rank / config["r"])


def run_vllm(python: str, request: dict, workdir: Path, limits: dict) -> dict:
    """vllm_runner.py on `request` (plus the scheduler `limits`) in the vLLM interpreter; its RESULT dict.
    The runner's whole output goes to workdir/vllm.log."""
    (workdir / "request.json").write_text(json.dumps({**request, **limits}))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    run = subprocess.run([python, str(RUNNER), str(workdir / "request.json"), str(workdir / "result.json")],
                         capture_output=True, text=True, env=env, check=False)
    (workdir / "vllm.log").write_text(run.stdout + run.stderr)
    if run.returncode != 0:
        raise RuntimeError(f"vLLM run failed (whole log: {workdir / 'vllm.log'}):\n{run.stderr[-4000:]}")
    return json.loads((workdir / "result.json").read_text())


@torch.no_grad()
def greedy_tokens(model, prompt: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    """(n greedy tokens of `prompt` (EOS ignored) with the KV cache, the first position's log-probs [vocab])."""
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    cache = DynamicCache()
    logits = model(input_ids=torch.tensor([prompt]), use_cache=True, **{key: cache}).logits
    first = logits[0, -1].float().log_softmax(-1)
    tokens = [int(logits[0, -1].argmax())]
    for _ in range(n - 1):
        logits = model(input_ids=torch.tensor([[tokens[-1]]]), use_cache=True, **{key: cache}).logits
        tokens.append(int(logits[0, -1].argmax()))
    return tokens, first


def accuracy(tokenizer, rows: list[dict], outputs: list[list[int]], eos: int | None) -> float:
    """Exact-match accuracy of greedy token outputs, cut at EOS, decoded and normalised as tasks.py does."""
    correct = 0
    for row, tokens in zip(rows, outputs):
        if eos is not None and eos in tokens:
            tokens = tokens[: tokens.index(eos)]
        correct += normalise_prediction(tokenizer.decode(tokens, skip_special_tokens=True)) == row["answer"].strip()
    return correct / len(rows)


def prinmix_tok_s(base: str, delta: str, n: int, prompts: list[list[int]], max_tokens: int, repeat: int) -> float:
    """MultiTenantModel tokens/s on `prompts` spread over n copies of `delta` (n = 0: the base alone)."""
    model = MultiTenantModel(base, dtype=torch.float32)
    tenants = [f"t{i}" for i in range(n)]
    for t in tenants:
        model.add_tenant(t, delta)
    per_prompt = [tenants[i % n] if n else None for i in range(len(prompts))]
    model.generate(prompts[:1], per_prompt[:1], 2)                                   # warm-up
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        state = model.prefill(prompts, per_prompt)
        for _ in range(max_tokens - 1):
            model.decode_step(state)
        best = min(best, time.perf_counter() - t0)
    return len(prompts) * max_tokens / best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True)
    p.add_argument("--finetuned", default=None, help="compared in the export's whole-model check")
    p.add_argument("--delta", required=True)
    p.add_argument("--tasks", required=True, help="held-out {prompt, answer} JSONL")
    p.add_argument("--vllm-python", required=True)
    p.add_argument("--max-rank", type=int, default=512,
                   help="export's --max-rank (default vLLM's largest: modules above it are truncated)")
    p.add_argument("--agreement-prompts", type=int, default=100)
    p.add_argument("--answer-tokens", type=int, default=8)
    p.add_argument("--n", default="1,4,8,16")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--no-warmup", action="store_true",
                   help="time vLLM's first generate call too (no untimed warm-up: for slow rank-512 CPU runs)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--vllm-batched-tokens", type=int, default=256,
                   help="vLLM's max_num_batched_tokens: its CPU LoRA ops (vllm/lora/ops/torch_ops) gather a copy of "
                        "each module's LoRA weights per token (tokens x h_out x rank floats), so a step of many "
                        "prompt tokens at rank 512 needs tens of GB; chunked prefill bounds it")
    p.add_argument("--vllm-max-seqs", type=int, default=16,
                   help="vLLM's max_num_seqs (bounds the per-token lm_head LoRA copies: vocab x rank floats each)")
    p.add_argument("--vllm-memory-gb", type=float, default=None,
                   help="memory the N adapters may take in vLLM (default 60 %% of MemAvailable); larger N are "
                        "reported as not run")
    p.add_argument("--adapter", default=None, help="serve this exported adapter instead of exporting --delta again")
    p.add_argument("--workdir", default=None)
    p.add_argument("--skip", default="", help="comma-separated parts to skip: agreement, throughput")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    work = Path(a.workdir or tempfile.mkdtemp(prefix="bench-vllm-"))
    work.mkdir(parents=True, exist_ok=True)
    ns = [int(x) for x in a.n.split(",")]
    tokenizer = AutoTokenizer.from_pretrained(a.base)
    rows = read_task_file(a.tasks)
    prompts_all = [tokenizer(r["prompt"], add_special_tokens=False)["input_ids"] for r in rows]

    if a.adapter:                                     # an adapter exported before (e.g. by a previous run)
        adapter = Path(a.adapter)
        r = json.loads((adapter / "adapter_config.json").read_text())["r"]
        report = {"r": r, "vllm_max_lora_rank": next(v for v in VLLM_MAX_LORA_RANKS if v >= r)}
        print(f"adapter {adapter}: r = {r} (not exported again)")
    else:
        t0 = time.time()
        adapter = work / "adapter"
        report = export_lora(a.base, a.delta, adapter, max_rank=a.max_rank, dtype=torch.float32, overwrite=True,
                             finetuned=a.finetuned, check_text=a.tasks)
        whole = report["whole_model"]
        print(f"export: r = {report['r']}, {len(report['modules'])} modules, "
              f"{report['adapter_bytes'] / 2**20:.1f} MiB, truncation error {report['truncation_rel_error']:.3g} "
              f"(per-module Frobenius), {time.time() - t0:.0f} s")
        print(f"export whole-model check ({whole['tokens']} tokens of {whole['text']}): adapter vs merge "
              f"{json.dumps(whole['adapter_vs_merge'])}")
        if "adapter_vs_finetuned" in whole:
            print(f"  adapter vs fine-tune {json.dumps(whole['adapter_vs_finetuned'])}")
            print(f"  merge vs fine-tune   {json.dumps(whole['merge_vs_finetuned'])}")
    rank = report["vllm_max_lora_rank"]
    limits = {"max_num_batched_tokens": a.vllm_batched_tokens, "max_num_seqs": a.vllm_max_seqs}
    skip = set(filter(None, a.skip.split(",")))

    if "agreement" not in skip:
        prompts = prompts_all[: a.agreement_prompts]
        sub = rows[: len(prompts)]
        t0 = time.time()
        result = run_vllm(a.vllm_python, {"model": a.base, "adapters": {"ft": str(adapter)}, "max_lora_rank": rank,
                                          "prompts": prompts, "max_tokens": a.answer_tokens, "max_model_len": 256,
                                          "runs": [{"name": "ft", "lora": ["ft"] * len(prompts)}]}, work, limits)
        vllm_out = [o["token_ids"] for o in result["outputs"]]
        vllm_first = [(o["token_ids"][0], o["logprobs"][0]) for o in result["outputs"]]
        eos = tokenizer.eos_token_id
        print(f"\nagreement, {len(prompts)} held-out prompts x {a.answer_tokens} greedy tokens:")
        print(f"  task accuracy: vLLM + adapter {100 * accuracy(tokenizer, sub, vllm_out, eos):.1f} %")
        # `prinmix merge` as users run it (the base's dtype: bfloat16 rounds base + ΔŴ) and --dtype float32
        # (base + ΔŴ exactly, what an adapter added at run time reproduces)
        for merge_dtype in (None, "float32"):
            merged_dir = api.merge(a.base, a.delta, work / "merged", overwrite=True, dtype=merge_dtype)
            merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
            merge_runs = [greedy_tokens(merged, q, a.answer_tokens) for q in prompts]
            del merged
            merge_out = [tokens for tokens, _ in merge_runs]
            # vLLM's log-prob of its first token against the merge's log-prob of that same token
            lp_diff = torch.tensor([abs(lp - float(first[t])) for (t, lp), (_, first) in zip(vllm_first, merge_runs)])
            same = sum(x == y for v, m in zip(vllm_out, merge_out) for x, y in zip(v, m))
            total = sum(len(m) for m in merge_out)
            label = f"prinmix merge --dtype {merge_dtype or 'as the base'}"
            print(f"  vLLM + exported adapter vs {label}: {same}/{total} tokens = {100 * same / total:.2f} %; "
                  f"first-token log-prob |vLLM - merge| max {float(lp_diff.max()):.3g}, mean {float(lp_diff.mean()):.3g}; "
                  f"merge's task accuracy {100 * accuracy(tokenizer, sub, merge_out, eos):.1f} %")
        print(f"  ({time.time() - t0:.0f} s)")

    if "throughput" not in skip:
        prompts = prompts_all[: a.requests]
        per_adapter = vllm_lora_bytes(adapter, rank)
        budget = a.vllm_memory_gb * 2**30 if a.vllm_memory_gb else 0.6 * available_memory_bytes()
        too_big = [n for n in ns if n * per_adapter > budget]
        ns = [n for n in ns if n not in too_big]
        for n in too_big:
            print(f"vLLM + {n} LoRA adapters: not run, needs ≈ {n * per_adapter / 2**30:.1f} GiB of adapters "
                  f"(loaded copy + engine slot at --max-lora-rank {rank}: {per_adapter / 2**30:.2f} GiB each) "
                  f"> {budget / 2**30:.1f} GiB (--vllm-memory-gb)")
        # N names (LoRA ids) for one adapter directory: vLLM loads and slots each id separately
        adapters = {f"a{i}": str(adapter) for i in range(max(ns, default=0))}
        runs = [{"name": f"n{n}", "lora": [f"a{i % n}" for i in range(len(prompts))], "repeat": a.repeat,
                 "warmup": not a.no_warmup} for n in ns]
        lora = run_vllm(a.vllm_python, {"model": a.base, "adapters": adapters, "max_lora_rank": rank, "prompts": prompts,
                                        "max_tokens": a.max_tokens, "max_model_len": 256, "runs": runs}, work, limits) if ns else None
        plain = run_vllm(a.vllm_python, {"model": a.base, "prompts": prompts, "max_tokens": a.max_tokens,
                                         "max_model_len": 256, "runs": [{"name": "base", "repeat": a.repeat, "warmup": not a.no_warmup}]}, work, limits)
        tokens = len(prompts) * a.max_tokens
        ref = tokens / min(plain["runs"]["base"]["seconds"])
        table = [("vLLM", "base alone", ref)]
        table += [("vLLM", f"{n} LoRA adapters", tokens / min(lora["runs"][f"n{n}"]["seconds"])) for n in ns]
        table += [("vLLM", f"{n} LoRA adapters", None) for n in too_big]
        table.append(("prinmix serve", "base alone", prinmix_tok_s(a.base, a.delta, 0, prompts, a.max_tokens, a.repeat)))
        table += [("prinmix serve", f"{n} packed deltas", prinmix_tok_s(a.base, a.delta, n, prompts, a.max_tokens,
                                                                       a.repeat)) for n in ns + too_big]
        print(f"\nthroughput: {len(prompts)} requests x {a.max_tokens} greedy tokens, fp32, CPU "
              f"({a.threads} threads for prinmix; vLLM's own), adapter r = {report['r']} "
              f"(--max-lora-rank {rank}), fastest of {a.repeat}")
        print(f"{'engine':<14} {'serving':<20} {'tok/s':>8} {'vs vLLM base':>13}")
        for engine, what, tok_s in table:
            if tok_s is None:
                print(f"{engine:<14} {what:<20} {'(memory)':>8} {'-':>13}")
            else:
                print(f"{engine:<14} {what:<20} {tok_s:>8.1f} {tok_s / ref:>12.2f}x")
        print(f"(memory: {Path(a.delta).stat().st_size / 2**20:.1f} MiB per packed delta; "
              f"≈ {per_adapter / 2**20:.0f} MiB per vLLM adapter at --max-lora-rank {rank}, fp32)")
        if lora is not None:
            print(f"(vLLM engine load: {lora['load_seconds']:.0f} s with LoRA, {plain['load_seconds']:.0f} s without)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
