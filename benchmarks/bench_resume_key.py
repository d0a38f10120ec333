"""What compress pays before its first layer for trust: the resume key's full content hash and the finiteness scan.

    python benchmarks/bench_resume_key.py [--pair /work/pairs/smollm2-arith] [--repeats 3]

The resume key of `prinmix compress` hashes every byte of both models (CheckpointReader.content_hash
(full=True)) so that a model edited only in bytes the sampled fingerprint skips does not reuse stale
resume parts; `check_inputs_finite` reads every tensor once more to refuse a NaN/Inf before the
per-layer work. Printed per model: the sampled fingerprint (the delta's base fingerprint, the
reference), the full hash, the finiteness scan, each with its ratio to the sampled hash, and the
bytes read per second. Timings are the best of --repeats runs with the files in the page cache (a
cold read adds the disk's time, the same for both full passes).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from prinmix.api import check_inputs_finite
from prinmix.checkpoint.reader import CheckpointReader


def best_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pair", default="/work/pairs/smollm2-arith", help="directory with base/ and finetuned/")
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    rows = []
    for role in ("base", "finetuned"):
        path = Path(a.pair) / role
        if not path.is_dir():
            continue
        reader = CheckpointReader(path)
        size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        reader.content_hash(full=True)  # warm the page cache
        sampled = best_seconds(lambda: reader.content_hash(), a.repeats)
        full = best_seconds(lambda: reader.content_hash(full=True), a.repeats)
        scan = best_seconds(lambda: check_inputs_finite(reader), a.repeats)
        rows.append((role, size, sampled, full, scan))
    print(f"pair {a.pair}, best of {a.repeats}, page cache warm")
    print(f"{'model':<10} {'MB':>8} {'sampled s':>10} {'full hash s':>12} {'× sampled':>10} {'MB/s':>8} "
          f"{'finite scan s':>14} {'× sampled':>10}")
    for role, size, sampled, full, scan in rows:
        print(f"{role:<10} {size / 1e6:>8.1f} {sampled:>10.4f} {full:>12.3f} {full / sampled:>10.0f} "
              f"{size / 1e6 / full:>8.0f} {scan:>14.3f} {scan / sampled:>10.0f}")


if __name__ == "__main__":
    main()
