"""A bounded loopback load on `prinmix serve`: does the server stay up, fast and bounded under hostile traffic?

The server runs as its own process (`prinmix serve`, as a user starts it) over a base and T tenants (T
names for one delta file; each holds its own payload). Each round fires C requests at once from C
client threads; a third of them are bad:
    malformed JSON, an unknown model, an invalid field value, an unsupported field, a 400 for a
    prompt far over --max-model-len (3 MiB of text, under the body limit: refused before tokenising),
    and a 413 for a body over --max-body-bytes (5 MiB against the default 4 MiB)
the rest are completions and chats (max_tokens 8, greedy or seeded sampling) spread over the base
and the tenants. A probe process polls /health all the time. First, alone: one 10 MB body and one
3 MiB prompt (issue 13: on the old server a 10 MB prompt stalled every endpoint for 17.7 s). Printed:
per round requests/s, p50/p99 latency of the good requests and of all, the slowest /health answer,
error counts by status, and the server's RSS (psutil) before and after each round; the totals last.

    python benchmarks/bench_server_load.py                          # tiny llama pair built locally
    python benchmarks/bench_server_load.py --base DIR --delta FILE  # a real base and its delta
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import os
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")
BAD_KINDS = ("malformed", "unknown_model", "invalid_value", "unsupported_field", "too_long", "oversized")


def tiny_base_and_delta(work: Path) -> tuple[Path, Path]:
    """The tiny llama pair (built locally) and its PrinMix 1/8 delta."""
    from prinmix import api
    from prinmix.api import CalibrationConfig
    from prinmix.tiny_models import TinyModelFactory

    base, ft = TinyModelFactory(work / "models").pair("llama")
    delta = work / "tenant.delta"
    if not delta.exists():
        calib = work / "calib.txt"
        calib.write_text("\n".join(f"{a}+{a + 7}={2 * a + 7}" for a in range(300)))
        api.compress(base, ft, delta, ratio="1/8", method="prinmix", device="cpu",
                     calibration=CalibrationConfig(calib=str(calib), nsamples=4, seqlen=32))
    return base, delta


def start_server(base: Path, delta: Path, tenants: int, port: int, work: Path, threads: int) -> subprocess.Popen:
    template = work / "chat_template.jinja"
    template.write_text(CHAT_TEMPLATE)
    cmd = [sys.executable, "-m", "prinmix.cli", "serve", str(base), "--port", str(port), "--max-num-seqs", "32",
           "--served-model-name", "base", "--chat-template", str(template), "--log-level", "error",
           "--lora-modules", *[f"t{i}={delta}" for i in range(tenants)]]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    log = work / "server.log"
    with open(log, "w") as stderr:                      # a file, not a pipe nobody reads (it would fill and block)
        server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    deadline = time.time() + 600
    while time.time() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited: {log.read_text()[-2000:]}")
        try:
            if call(port, "GET", "/health", None, 2)[0] == 200:
                return server
        except OSError:
            time.sleep(0.5)
    server.kill()
    raise SystemExit("the server did not come up within 600 s")


def call(port: int, method: str, path: str, body: bytes | None, timeout: float = 300) -> tuple[int | str, float]:
    """(HTTP status or the connection error's name, seconds)."""
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"} if body else {})
        response = conn.getresponse()
        response.read()
        status = response.status
    except (OSError, http.client.HTTPException) as e:
        status = type(e).__name__
    finally:
        conn.close()
    return status, time.perf_counter() - t0


def make_request(i: int, tenants: int, rng: random.Random) -> tuple[str, str, bytes]:
    """(kind, path, body) of request i: every third one bad, cycling through BAD_KINDS."""
    model = "base" if i % (tenants + 1) == tenants else f"t{i % (tenants + 1)}"
    if i % 3 == 2:
        kind = BAD_KINDS[(i // 3) % len(BAD_KINDS)]
        body = {"malformed": b'{"model": "base", "prompt": ',
                "unknown_model": json.dumps({"model": "nope", "prompt": "1+1="}).encode(),
                "invalid_value": json.dumps({"model": model, "prompt": "1+1=", "max_tokens": -3}).encode(),
                "unsupported_field": json.dumps({"model": model, "prompt": "1+1=", "presence_penalty": 1}).encode(),
                "too_long": json.dumps({"model": model, "prompt": "12+35=" * (3 * 2**20 // 6)}).encode(),
                "oversized": json.dumps({"model": model, "prompt": "x" * 5 * 2**20}).encode()}[kind]
        return kind, "/v1/completions", body
    sampling = {"temperature": 0} if rng.random() < 0.5 else {"temperature": 0.8, "top_p": 0.9, "seed": i}
    if i % 3 == 1:
        return "chat", "/v1/chat/completions", json.dumps(
            {"model": model, "messages": [{"role": "user", "content": f"{i}+{i % 7}="}], "max_tokens": 8,
             **sampling}).encode()
    return "completion", "/v1/completions", json.dumps(
        {"model": model, "prompt": f"{i % 50}+{i % 13}=", "max_tokens": 8, **sampling}).encode()


def health_probe(port: int, stop, worst) -> None:
    """Polls /health until `stop` is set; `worst` (a shared double) gets the slowest answer. Runs in its own
    process, so the 200 client threads (and their GIL) do not delay the probe: what it measures is the server."""
    while not stop.is_set():
        status, seconds = call(port, "GET", "/health", None, 30)
        worst.value = max(worst.value, seconds if status == 200 else float("inf"))
        time.sleep(0.05)


def with_health_probe(port: int, work):
    """(work(), the slowest /health answer in seconds while it ran)."""
    ctx = multiprocessing.get_context("spawn")
    stop, worst = ctx.Event(), ctx.Value("d", 0.0)
    probe = ctx.Process(target=health_probe, args=(port, stop, worst), daemon=True)
    probe.start()
    time.sleep(1.0)                                    # the probe's interpreter is up
    try:
        return work(), worst.value
    finally:
        stop.set()
        probe.join()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default=None, help="base model directory (default: the tiny llama built locally)")
    ap.add_argument("--delta", default=None, help="a delta of --base (required with --base)")
    ap.add_argument("--tenants", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--concurrency", type=int, default=200)
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the server")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="prinmix-load-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.base:
        if not args.delta:
            raise SystemExit("--base needs --delta")
        base, delta = Path(args.base), Path(args.delta)
    else:
        base, delta = tiny_base_and_delta(work)
    rng = random.Random(0)
    server = start_server(base, delta, args.tenants, args.port, work, args.threads)
    proc = psutil.Process(server.pid)
    rss = lambda: proc.memory_info().rss / 2**20
    print(f"server pid {server.pid}: {args.tenants} tenants on {base.name}, {args.rounds} rounds x "
          f"{args.concurrency} concurrent requests (a third bad), RSS {rss():.0f} MiB at start\n")
    header = (f"{'round':>5} {'req/s':>7} {'good p50 s':>10} {'good p99 s':>10} {'all p50 s':>9} {'all p99 s':>9} "
              f"{'max /health s':>13} {'RSS before':>10} {'RSS after':>9}  statuses")
    for label, body in (("10 MB body", json.dumps({"model": "base", "prompt": "x" * 10**7}).encode()),
                        ("3 MiB prompt", json.dumps({"model": "base", "prompt": "12+35=" * (2**20 // 2)}).encode())):
        before = rss()
        (status, seconds), health = with_health_probe(args.port, lambda b=body: call(args.port, "POST",
                                                                                     "/v1/completions", b))
        print(f"alone, {label:>12}: answered {status} in {seconds:.3f} s; slowest /health meanwhile {health:.3f} s; "
              f"RSS {before:.0f} -> {rss():.0f} MiB")
    print()
    print(header)
    print("-" * len(header))
    totals: Counter = Counter()
    all_good, all_any, elapsed_total, worst_health = [], [], 0.0, 0.0
    start_rss = rss()
    try:
        for rnd in range(args.rounds):
            requests = [make_request(rnd * args.concurrency + i, args.tenants, rng) for i in range(args.concurrency)]
            before = rss()

            def fire(batch=requests):
                t0 = time.perf_counter()
                with ThreadPoolExecutor(args.concurrency) as pool:
                    done = list(pool.map(lambda r: (r[0], *call(args.port, "POST", r[1], r[2])), batch))
                return done, time.perf_counter() - t0

            (results, elapsed), health = with_health_probe(args.port, fire)
            statuses = Counter(str(status) for _, status, _ in results)
            good = [s for kind, status, s in results if kind in ("chat", "completion") and status == 200]
            every = [s for _, _, s in results]
            totals.update(statuses)
            all_good += good
            all_any += every
            elapsed_total += elapsed
            worst_health = max(worst_health, health)
            print(f"{rnd:>5} {len(results) / elapsed:>7.1f} {percentile(good, 0.5):>10.2f} "
                  f"{percentile(good, 0.99):>10.2f} {percentile(every, 0.5):>9.2f} {percentile(every, 0.99):>9.2f} "
                  f"{health:>13.3f} {before:>8.0f}Mi {rss():>7.0f}Mi  "
                  + " ".join(f"{k}:{v}" for k, v in sorted(statuses.items())))
        alive = server.poll() is None and call(args.port, "GET", "/health", None, 5)[0] == 200
        end_rss = rss()
    finally:
        server.terminate()
        server.wait(30)
    n = len(all_any)
    print("-" * len(header))
    print(f"{'all':>5} {n / elapsed_total:>7.1f} {percentile(all_good, 0.5):>10.2f} {percentile(all_good, 0.99):>10.2f} "
          f"{percentile(all_any, 0.5):>9.2f} {percentile(all_any, 0.99):>9.2f} {worst_health:>13.3f} "
          f"{start_rss:>8.0f}Mi {end_rss:>7.0f}Mi  " + " ".join(f"{k}:{v}" for k, v in sorted(totals.items())))
    expected_good = sum(1 for i in range(n) if i % 3 != 2)
    print(f"\ngood requests answered 200: {len(all_good)}/{expected_good}; server alive after the load: {alive}; "
          f"RSS growth {end_rss - start_rss:+.0f} MiB ({end_rss / start_rss:.2f}x)")
    print("(ConnectionResetError: an oversized body's 413 arrived while the client was still sending; uvicorn closes "
          "the connection without reading the rest)")


if __name__ == "__main__":
    main()
