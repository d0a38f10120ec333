"""Benchmark of the Eq. 8 bit allocation: our exact solver vs SCIP and HiGHS on Qwen2.5-7B shapes.

Instances: the 7 matrix shapes of Qwen2.5-7B (h_out × h_in, r = min), candidate widths
{0,2,3,4,5,6,7,8}, cost(b) = b·(h_in + h_out) + 48 bits (0 for width 0), budget
floor(α·16·h_out·h_in) bits, synthetic error tables shaped like real ones (σ_i² decaying,
E[i,0] = σ_i²·row energy, ~4× less error per extra bit, lognormal noise).

    python benchmarks/bench_allocation.py --quick
    python benchmarks/bench_allocation.py > /tmp/bench_allocation.txt

Last line: `allocation: N/N instances optimal, median speed-up vs SCIP X×, whole 7B model (196 matrices) Y s`.
"optimal": our objective equals the best certified optimum of SCIP/HiGHS within 1e-9 relative;
an instance where both references time out cannot be verified and is not counted as optimal.
Times are process CPU time (the benchmark machine may be shared): ours = the fastest of 5 runs,
SCIP/HiGHS = one solve, model building excluded. A SCIP time-out counts as the time spent
(so the speed-up is then a lower bound, marked ≥). The whole-model time Y is wall-clock.
"""

from __future__ import annotations

import argparse
import time
from fractions import Fraction

import numpy as np

from prinmix.algorithms.allocation import allocate_bits
from prinmix.algorithms.allocation_milp import solve_allocation_milp
from prinmix.algorithms.budget import budget_bits, prinmix_rank_cost_bits

WIDTHS = np.array([0, 2, 3, 4, 5, 6, 7, 8])
QWEN25_7B = {  # name: (h_out, h_in)
    "q_proj": (3584, 3584), "k_proj": (512, 3584), "v_proj": (512, 3584), "o_proj": (3584, 3584),
    "gate_proj": (18944, 3584), "up_proj": (18944, 3584), "down_proj": (3584, 18944),
}
N_LAYERS = 28


def error_table(h_out: int, h_in: int, rng: np.random.Generator) -> np.ndarray:
    """float64 [r, 8] synthetic E[i, width]: σ_i² · row energy · relative MSE of a b-bit min-max quantiser."""
    r = min(h_out, h_in)
    i = np.arange(r)
    if rng.random() < 0.5:
        sigma2 = (i + 1.0) ** -rng.uniform(0.5, 1.2)                 # power-law spectrum
    else:
        sigma2 = np.exp(-i / (r * rng.uniform(0.05, 0.3)))            # exponential spectrum
    e0 = sigma2 * rng.lognormal(0.0, 0.3, r)                          # E[i, 0]: rank dropped
    b = WIDTHS[1:]
    rel_mse = (7.0 / (2.0 ** b - 1)) ** 2 / 12                        # ≈ 4× less per extra bit
    E = np.empty((r, WIDTHS.size))
    E[:, 0] = e0
    E[:, 1:] = e0[:, None] * rel_mse[None, :] * rng.lognormal(0.0, 0.15, (r, b.size))
    return E


def rank_costs(h_out: int, h_in: int) -> np.ndarray:
    """Stored bits of one rank at each width in PrinMix's layout (budget.prinmix_rank_cost_bits)."""
    return np.array([prinmix_rank_cost_bits(int(b), h_out, h_in) for b in WIDTHS], dtype=np.int64)


def time_ours(E, costs, budget, fmax, repeats=5):
    """(allocation, min CPU seconds over `repeats` runs)."""
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        a = allocate_bits(E, costs, budget, fmax)
        times.append(time.process_time() - t0)
    return a, min(times)


def run_milp(E, costs, budget, fmax, solver, time_limit):
    stats = {}
    try:
        a = solve_allocation_milp(E, costs, budget, fmax, solver=solver, time_limit=time_limit, stats=stats)
    except Exception as e:          # a reference that fails is reported, not fatal
        return None, stats.get("solve_cpu_seconds", float("nan")), f"error: {e}"
    return a, stats["solve_cpu_seconds"], stats["status"]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="q_proj, k_proj, gate_proj at α=1/16, fmax 2 and 4")
    p.add_argument("--time-limit", type=float, default=120.0,
                   help="seconds per SCIP solve (CPU time) and HiGHS solve (wall-clock)")
    p.add_argument("--alphas", default="1/16,1/32", help="comma-separated ratios")
    p.add_argument("--fmax", default="2,3,4,5,6", help="comma-separated fmax values")
    p.add_argument("--shapes", default=",".join(QWEN25_7B), help="comma-separated matrix names")
    p.add_argument("--no-scip", action="store_true")
    p.add_argument("--no-highs", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    names = args.shapes.split(",")
    alphas = [Fraction(a) for a in args.alphas.split(",")]
    fmaxes = [int(f) for f in args.fmax.split(",")]
    if args.quick:
        names, alphas, fmaxes = ["q_proj", "k_proj", "gate_proj"], [Fraction(1, 16)], [2, 4]

    print(f"{'matrix':<10} {'h_out×h_in':>11} {'α':>5} {'fmax':>4} {'obj ours':>14} {'obj SCIP':>16} "
          f"{'obj HiGHS':>16} {'ours ms':>8} {'SCIP s':>8} {'HiGHS s':>8} {'vs SCIP':>9}  ok", flush=True)
    n_ok, n_total, speedups, unverified = 0, 0, [], []
    for name in names:
        h_out, h_in = QWEN25_7B[name]
        E = error_table(h_out, h_in, np.random.default_rng([args.seed, list(QWEN25_7B).index(name)]))
        costs = rank_costs(h_out, h_in)
        for alpha in alphas:
            budget = budget_bits(alpha, h_out, h_in)
            for fmax in fmaxes:
                ours, t_ours = time_ours(E, costs, budget, fmax)
                refs = {}
                for solver, skip in (("scip", args.no_scip), ("highs", args.no_highs)):
                    refs[solver] = (None, float("nan"), "skipped") if skip else \
                        run_milp(E, costs, budget, fmax, solver, args.time_limit)
                certified = [a.objective for a, _, _ in refs.values() if a is not None and a.certified]
                best = min(certified) if certified else None
                ok = best is not None and ours.certified and \
                    abs(ours.objective - best) <= 1e-9 * max(abs(best), 1e-300)
                n_total += 1
                n_ok += ok
                if best is None:
                    incumbents = [a.objective for a, _, _ in refs.values() if a is not None]
                    duals = [a.lower_bound for a, _, _ in refs.values() if a is not None]
                    unverified.append((ours.objective <= min(incumbents, default=np.inf) * (1 + 1e-9),
                                       ours.objective >= max(duals, default=-np.inf) * (1 - 1e-9)))
                a_s, t_s, st_s = refs["scip"]
                speed = ""
                if a_s is not None or st_s == "timelimit":
                    speedups.append(t_s / t_ours)
                    speed = ("≥" if st_s != "optimal" else "") + f"{t_s / t_ours:.0f}×"
                cols = []
                for solver in ("scip", "highs"):
                    a, _, st = refs[solver]
                    if a is None:
                        cols.append(st[:14])
                    elif a.certified:
                        cols.append(f"{a.objective:.10g}")
                    else:  # time-out: best objective found / dual bound
                        cols.append(f"t/o {a.objective:.6g}≥{a.lower_bound:.6g}"[:16])
                print(f"{name:<10} {f'{h_out}×{h_in}':>11} {str(alpha):>5} {fmax:>4} {ours.objective:>14.10g} "
                      f"{cols[0]:>16} {cols[1]:>16} {t_ours * 1e3:>8.1f} {refs['scip'][1]:>8.2f} "
                      f"{refs['highs'][1]:>8.2f} {speed:>9}  {'yes' if ok else 'NO'}", flush=True)

    # whole model: 28 layers × 7 matrices at α = 1/16, fmax = 4, each with its own error table
    total, total_cpu, n_uncertified = 0.0, 0.0, 0
    for layer in range(N_LAYERS):
        for m, (name, (h_out, h_in)) in enumerate(QWEN25_7B.items()):
            E = error_table(h_out, h_in, np.random.default_rng([args.seed, 1000 + layer, m]))
            costs, budget = rank_costs(h_out, h_in), budget_bits(1 / 16, h_out, h_in)
            t0, c0 = time.perf_counter(), time.process_time()
            a = allocate_bits(E, costs, budget, 4)
            total += time.perf_counter() - t0
            total_cpu += time.process_time() - c0
            n_uncertified += not a.certified
    if unverified:
        print(f"{len(unverified)} instance(s) unverified (SCIP and HiGHS both timed out): ours ≤ their best "
              f"incumbent in {sum(u[0] for u in unverified)}, ≥ their best dual bound in "
              f"{sum(u[1] for u in unverified)}")
    print(f"whole model: {N_LAYERS * len(QWEN25_7B)} matrices at α=1/16, fmax=4: wall {total:.2f} s, "
          f"CPU {total_cpu:.2f} s, {n_uncertified} not certified")
    median = f"{np.median(speedups):.0f}" if speedups else "n/a"
    print(f"allocation: {n_ok}/{n_total} instances optimal, median speed-up vs SCIP {median}×, "
          f"whole 7B model ({N_LAYERS * len(QWEN25_7B)} matrices) {total:.1f} s", flush=True)


if __name__ == "__main__":
    main()
