"""Throughput under load with more tenants than fit as dense models: prinmix vs naive with swapping.

R requests for N tenants arrive as a Poisson process (rate λ requests/s); the tenant of each is drawn
uniformly or by Zipf popularity (P(tenant i) ∝ 1/i^s, as DeltaZip and the paper's Table 14). Each
request: a random prompt of P tokens, then D greedy tokens. Two servers, each measured for real
(every forward and every weight load is timed), on a virtual clock: arrivals are scheduled on it,
the clock advances by the measured time of each operation and jumps to the next arrival when idle.

    prinmix  MultiTenantModel: the base once, all N packed deltas resident; delta products by
             --backend (auto: the packed C++ kernel on CPU where it builds — nothing but the packed
             deltas is held; cached: the hottest tenants' dequantised factors in the FactorCache, its
             budget what the memory budget leaves); continuous batching: arrivals are prefilled and
             join the running batch (≤ --max-batch), one decode step per iteration for every running
             sequence, finished ones leave
    naive    --naive-slots dense fine-tunes resident (LRU); the oldest waiting request's tenant is
             served next with all its waiting requests as one batch (HF generate); a tenant not
             resident is swapped in by loading its merged weights from disk into the least recently
             used slot (safetensors load + load_state_dict, timed)

Memory budget (the paper's setting): base + 2 dense copies. The naive server holds --naive-slots
(default 2) copies; prinmix holds the base, the N deltas and a factor cache of what is left (none
when the deltas alone exceed it: then it is printed over budget). N tenants are N copies of one
delta / merged fine-tune registered under different names (the bytes and the work are the same).

    python benchmarks/bench_serving_poisson.py                              # tiny llama pair, quick
    python benchmarks/bench_serving_poisson.py --base DIR --delta FILE --tenants 8,32 --rate 2
Reported per (N, popularity): requests/s = R / (last finish − first arrival), mean and p90
end-to-end latency (finish − arrival), swaps (naive) and factor-cache hit rate (prinmix, cached backend); the last
lines are the ratios prinmix / naive of requests/s and of mean latency, measured in this run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.utils import logging as hf_logging

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serving import add_pair_arguments, prepare  # noqa: E402

from prinmix.runtime.decode_state import DecodeState, left_padded  # noqa: E402
from prinmix.runtime.delta_linear import runs_packed_kernel  # noqa: E402
from prinmix.runtime.multi_tenant import MultiTenantModel  # noqa: E402


@dataclass
class Request:
    rid: int
    tenant: str
    arrival: float
    prompt: list[int]
    finish: float | None = None


def workload(n_tenants: int, n_requests: int, rate: float, popularity: str, zipf_s: float, prompt_len: int,
             vocab: int, seed: int = 0) -> list[Request]:
    """Poisson arrivals (exponential gaps of mean 1/rate s) with tenants drawn by popularity."""
    g = torch.Generator().manual_seed(seed)
    gaps = torch.empty(n_requests).exponential_(rate, generator=g)
    arrivals = torch.cumsum(gaps, 0) - gaps[0]
    if popularity == "uniform":
        weights = torch.ones(n_tenants)
    else:
        weights = 1.0 / torch.arange(1, n_tenants + 1, dtype=torch.float64) ** zipf_s
    tenants = torch.multinomial(weights, n_requests, replacement=True, generator=g).tolist()
    return [Request(i, f"tenant{t}", float(a), torch.randint(3, vocab, (prompt_len,), generator=g).tolist())
            for i, (t, a) in enumerate(zip(tenants, arrivals.tolist()))]


def serve_prinmix(model: MultiTenantModel, requests: list[Request], n_new: int, max_batch: int) -> None:
    """Continuous batching on a virtual clock; sets each request's finish time."""
    pending, clock, state = deque(requests), 0.0, None
    by_id = {r.rid: r for r in requests}
    while pending or (state is not None and len(state)):
        if (state is None or not len(state)) and pending and pending[0].arrival > clock:
            clock = pending[0].arrival
        room = max_batch - (len(state) if state is not None else 0)
        batch = []
        while pending and pending[0].arrival <= clock and len(batch) < room:
            batch.append(pending.popleft())
        t0 = time.perf_counter()
        if batch:
            new = model.prefill([r.prompt for r in batch], [r.tenant for r in batch], [r.rid for r in batch])
            state = new if state is None else DecodeState.join(state, new)
        ready = [s.seq_id for s in state.seqs if len(s.generated) >= n_new]
        state.drop(ready)
        if len(state):
            model.decode_step(state)
        clock += time.perf_counter() - t0
        for rid in ready:
            by_id[rid].finish = clock
        done = [s.seq_id for s in state.seqs if len(s.generated) >= n_new]
        state.drop(done)
        for rid in done:
            by_id[rid].finish = clock


class NaiveServer:
    """`slots` dense models; a tenant's weights are loaded from `merged_dir` into the LRU slot."""

    def __init__(self, merged_dir: Path, slots: int, threads: int):
        self.weights_file = merged_dir / "model.safetensors"
        self.models = [AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype="auto").eval()
                       for _ in range(slots)]
        self.resident: OrderedDict[str, int] = OrderedDict()       # tenant → slot, LRU first
        self.swaps = 0
        self.swap_s = 0.0

    def model_for(self, tenant: str):
        if tenant in self.resident:
            self.resident.move_to_end(tenant)
            return self.models[self.resident[tenant]]
        t0 = time.perf_counter()
        slot = len(self.resident) if len(self.resident) < len(self.models) else self.resident.popitem(last=False)[1]
        model = self.models[slot]
        model.load_state_dict(load_file(self.weights_file), strict=False)     # tied lm_head is not stored
        self.resident[tenant] = slot
        self.swaps += 1
        self.swap_s += time.perf_counter() - t0
        return model

    def serve(self, requests: list[Request], n_new: int, max_batch: int) -> None:
        waiting, pending, clock = [], deque(requests), 0.0
        while pending or waiting:
            if not waiting and pending[0].arrival > clock:
                clock = pending[0].arrival
            while pending and pending[0].arrival <= clock:
                waiting.append(pending.popleft())
            tenant = waiting[0].tenant
            batch = [r for r in waiting if r.tenant == tenant][:max_batch]
            t0 = time.perf_counter()
            model = self.model_for(tenant)
            _generate(model, [r.prompt for r in batch], n_new)
            clock += time.perf_counter() - t0
            for r in batch:
                r.finish = clock
            waiting = [r for r in waiting if r.finish is None]


def _generate(model, prompts: list[list[int]], n_new: int) -> None:
    ids, mask, _ = left_padded(prompts)
    with torch.no_grad():
        model.generate(ids, attention_mask=mask, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                       pad_token_id=0)


def _stats(requests: list[Request]) -> dict:
    lat = torch.tensor([r.finish - r.arrival for r in requests])
    span = max(r.finish for r in requests) - min(r.arrival for r in requests)
    return {"rps": len(requests) / span, "mean": float(lat.mean()), "p90": float(lat.quantile(0.9))}


def _dense_bytes(merged: Path) -> int:
    return sum(t.numel() * t.element_size() for t in load_file(merged / "model.safetensors").values())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_pair_arguments(p, ratio="1/16")
    p.add_argument("--tenants", default="8,32")
    p.add_argument("--popularity", default="uniform,zipf")
    p.add_argument("--zipf-s", type=float, default=1.5, help="Zipf exponent of the tenant popularity")
    p.add_argument("--requests", type=int, default=64, help="requests per (N, popularity)")
    p.add_argument("--rate", type=float, default=4.0, help="Poisson arrival rate, requests/s")
    p.add_argument("--prefill", type=int, default=32)
    p.add_argument("--decode", type=int, default=16)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--naive-slots", type=int, default=2, help="dense copies the naive server keeps")
    p.add_argument("--backend", default="auto", choices=["auto", "packed", "cached", "torch"],
                   help="prinmix's delta products (DeltaLinear backend; auto: the packed kernel on CPU where it builds)")
    p.add_argument("--cache-dtype", default="int4", choices=["int4", "int8", "float32", "bfloat16"],
                   help="factor cache dtype (cached backend)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()

    base, delta, merged = prepare(args)
    vocab = AutoConfig.from_pretrained(base).get_text_config().vocab_size
    dense = _dense_bytes(merged)
    budget = 3 * dense                                      # base + 2 dense copies
    packed = runs_packed_kernel(args.backend, "cpu")
    print(f"base {base}\ndelta {delta} ({delta.stat().st_size / 2 ** 20:.1f} MiB)\nmemory budget base + 2 dense "
          f"copies = {budget / 2 ** 20:.0f} MiB; naive keeps {args.naive_slots} copies "
          f"({args.naive_slots * dense / 2 ** 20:.0f} MiB)\nR = {args.requests} requests at λ = {args.rate}/s, "
          f"P = {args.prefill}, D = {args.decode}, max batch {args.max_batch}, {args.threads} threads, "
          f"Zipf s = {args.zipf_s}, load average {os.getloadavg()[0]:.1f}\nprinmix delta products: "
          f"{'the packed C++ kernel' if packed else 'backend ' + args.backend + ', factor cache ' + args.cache_dtype}\n")
    naive = NaiveServer(merged, args.naive_slots, args.threads)
    _generate(naive.models[0], [[5, 6, 7]], 2)                                     # warm-up
    head = (f"{'N':>3} {'popularity':>10} | {'req/s p/n':>13} | {'mean lat s p/n':>15} | {'p90 lat s p/n':>15} | "
            f"{'swaps n':>7} {'swap s':>6} | {'prinmix MiB':>11} {'cache hit':>9}")
    print(head)
    print("-" * len(head))
    ratios = []
    for n in [int(x) for x in args.tenants.split(",")]:
        model = MultiTenantModel(base, backend=args.backend, factor_cache_bytes=0 if packed else 1,
                                 factor_cache_dtype=getattr(torch, args.cache_dtype))
        for i in range(n):
            model.add_tenant(f"tenant{i}", delta)
        mem = model.memory()
        if model.factor_cache is not None:
            model.factor_cache.budget_bytes = max(0, budget - mem["base_bytes"] - mem["delta_bytes"])
        model.generate([[5, 6, 7]], ["tenant0"], 2)                                # warm-up
        for pop in args.popularity.split(","):
            if model.factor_cache is not None:
                model.factor_cache.clear()
                model.factor_cache.hits = model.factor_cache.misses = 0
            reqs = workload(n, args.requests, args.rate, pop, args.zipf_s, args.prefill, vocab)
            serve_prinmix(model, reqs, args.decode, args.max_batch)
            sp = _stats(reqs)
            reqs = workload(n, args.requests, args.rate, pop, args.zipf_s, args.prefill, vocab)
            naive.resident.clear()
            naive.swaps, naive.swap_s = 0, 0.0
            naive.serve(reqs, args.decode, args.max_batch)
            sn = _stats(reqs)
            c = model.factor_cache
            hit = "-" if c is None else f"{c.hits / max(1, c.hits + c.misses):.2f}"
            used = sum(model.memory().values())
            over = "!" if used > budget else " "
            print(f"{n:>3} {pop:>10} | {sp['rps']:>6.2f}/{sn['rps']:<6.2f} | {sp['mean']:>7.2f}/{sn['mean']:<7.2f} | "
                  f"{sp['p90']:>7.2f}/{sn['p90']:<7.2f} | {naive.swaps:>7} {naive.swap_s:>6.1f} | "
                  f"{used / 2 ** 20:>10.0f}{over} {hit:>9}", flush=True)
            ratios.append((n, pop, sp["rps"] / sn["rps"], sn["mean"] / sp["mean"]))
        del model
    print(f"\n(! = prinmix over the memory budget: its deltas alone exceed it)  load average {os.getloadavg()[0]:.1f}")
    for n, pop, r_rps, r_lat in ratios:
        print(f"ratio N={n} {pop}: prinmix/naive requests/s {r_rps:.2f}x, naive/prinmix mean latency {r_lat:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
