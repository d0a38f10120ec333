"""Eq. 8 bit allocation: exact against brute force (tiny) and zero-gap MILP (medium)."""

import itertools

import numpy as np
import pytest

from prinmix.algorithms.allocation import Allocation, allocate_bits
from prinmix.algorithms.allocation_milp import solve_allocation_milp
from prinmix.errors import BudgetError

WIDTHS = np.array([0, 2, 3, 4, 5, 6, 7, 8])


def brute_force(E, costs, budget, fmax):
    """Optimal objective of Eq. 8 over all nb^r assignments (None if infeasible)."""
    r, nb = E.shape
    best = None
    for x in itertools.product(range(nb), repeat=r):
        if sum(int(costs[j]) for j in x) <= budget and len(set(x)) <= fmax:
            obj = float(sum(E[i, j] for i, j in enumerate(x)))
            if best is None or obj < best:
                best = obj
    return best


def assert_valid(a: Allocation, E, costs, budget, fmax):
    r = E.shape[0]
    assert a.choice.dtype == np.int64 and a.choice.shape == (r,)
    assert np.all((a.choice >= 0) & (a.choice < E.shape[1]))
    assert a.cost == int(np.asarray(costs)[a.choice].sum()) <= budget
    assert len(set(a.choice.tolist())) <= fmax
    assert a.objective == pytest.approx(float(E[np.arange(r), a.choice].sum()), rel=1e-12, abs=1e-12)
    assert a.certified
    assert a.lower_bound <= a.objective
    assert a.lower_bound >= a.objective - 1e-9 * max(1.0, abs(a.objective))


def assert_same_objective(ours, ref):
    assert ours == pytest.approx(ref, rel=1e-9, abs=1e-12)


def tiny_instance(rng, kind):
    r = int(rng.integers(1, 7))
    nb = int(rng.integers(1, 5))
    if kind == "random":                       # arbitrary, non-monotone in the width
        E = rng.random((r, nb))
    elif kind == "ties":                        # many exact ties
        E = rng.integers(0, 3, (r, nb)).astype(np.float64)
    else:                                       # decaying like real tables, with noise
        E = (0.25 ** np.arange(nb))[None, :] * rng.lognormal(0, 0.5, (r, nb)) / (1.0 + np.arange(r))[:, None]
    costs = rng.integers(0, 8, nb)
    if rng.random() < 0.5:
        costs[0] = 0
    budget = int(rng.integers(0, int(costs.max()) * r + 3))
    fmax = int(rng.integers(1, nb + 2))
    return E, costs, budget, fmax


@pytest.mark.parametrize("kind", ["random", "ties", "decaying"])
@pytest.mark.parametrize("seed", range(4))
def test_equals_brute_force_on_tiny_instances(kind, seed):
    rng = np.random.default_rng(1000 * seed + len(kind))
    for _ in range(80):
        E, costs, budget, fmax = tiny_instance(rng, kind)
        ref = brute_force(E, costs, budget, fmax)
        if ref is None:
            with pytest.raises(BudgetError, match="at least"):
                allocate_bits(E, costs, budget, fmax)
            continue
        a = allocate_bits(E, costs, budget, fmax)
        assert_valid(a, E, costs, budget, fmax)
        assert_same_objective(a.objective, ref)


def test_fallback_milp_path_is_exact():
    """max_states=1 forces the HiGHS fallback for the reduced problem; still brute-force exact."""
    rng = np.random.default_rng(7)
    for _ in range(60):
        E, costs, budget, fmax = tiny_instance(rng, "ties" if rng.random() < 0.5 else "random")
        ref = brute_force(E, costs, budget, fmax)
        if ref is None:
            continue
        a = allocate_bits(E, costs, budget, fmax, max_states=1)
        assert_valid(a, E, costs, budget, fmax)
        assert_same_objective(a.objective, ref)


def test_fmax_one_picks_best_single_width():
    E = np.array([[10.0, 4.0, 1.0], [8.0, 3.0, 0.5], [1.0, 0.9, 0.1]])
    costs = np.array([0, 2, 4])
    # one width for all ranks: width 1 costs 6 ≤ 7 (objective 7.9); width 2 costs 12 > 7
    a = allocate_bits(E, costs, 7, 1)
    assert a.choice.tolist() == [1, 1, 1] and a.objective == pytest.approx(7.9)
    # two widths do not help here (every mix of two within 7 bits is worse) ...
    assert allocate_bits(E, costs, 7, 2).objective == pytest.approx(7.9)
    # ... three do: [2, 1, 0] costs 6, objective 5.0
    b = allocate_bits(E, costs, 7, 3)
    assert b.objective == pytest.approx(brute_force(E, costs, 7, 3)) == pytest.approx(5.0)


def test_non_monotone_errors_can_prefer_cheaper_width():
    # width column 2 is worse than column 1 for rank 0 although it costs more
    E = np.array([[5.0, 1.0, 3.0], [5.0, 4.0, 0.5]])
    costs = np.array([0, 3, 5])
    a = allocate_bits(E, costs, 8, 3)
    assert a.choice.tolist() == [1, 2] and a.objective == pytest.approx(1.5)


def test_budget_zero_uses_zero_cost_candidate():
    rng = np.random.default_rng(3)
    E = rng.random((50, 4))
    costs = np.array([0, 5, 7, 9])
    a = allocate_bits(E, costs, 0, 2)
    assert a.choice.tolist() == [0] * 50 and a.cost == 0 and a.certified
    # two zero-cost candidates and fmax=1: the better of the two columns in total
    costs2 = np.array([0, 0, 7, 9])
    b = allocate_bits(E, costs2, 0, 1)
    assert b.objective == pytest.approx(min(E[:, 0].sum(), E[:, 1].sum()))
    c = allocate_bits(E, costs2, 0, 2)
    assert c.objective == pytest.approx(np.minimum(E[:, 0], E[:, 1]).sum())


def test_huge_budget_is_unconstrained_optimum():
    rng = np.random.default_rng(4)
    E = rng.random((300, 8))
    costs = np.where(WIDTHS > 0, WIDTHS * 100 + 48, 0)
    a = allocate_bits(E, costs, 10**15, 8)
    assert_same_objective(a.objective, E.min(axis=1).sum())
    assert_valid(a, E, costs, 10**15, 8)


def test_infeasible_budget_raises_with_minimum():
    E = np.ones((10, 3))
    costs = np.array([4, 6, 9])            # no zero-cost candidate
    with pytest.raises(BudgetError, match="at least 40 bits"):
        allocate_bits(E, costs, 39, 2)
    a = allocate_bits(E, costs, 40, 2)
    assert a.choice.tolist() == [0] * 10
    with pytest.raises(BudgetError):
        allocate_bits(np.ones((3, 2)), np.array([0, 1]), -1, 1)


def test_empty_allocation():
    a = allocate_bits(np.zeros((0, 8)), np.arange(8), 0, 3)
    assert a.choice.shape == (0,) and a.objective == 0.0 and a.cost == 0 and a.certified
    with pytest.raises(BudgetError):
        allocate_bits(np.zeros((0, 8)), np.arange(8), -1, 3)


@pytest.mark.parametrize("bad, match", [
    (dict(errors=np.ones(5)), "2-D"),
    (dict(costs=np.array([0, 1])), "shape"),
    (dict(errors=np.array([[1.0, np.nan, 0.0]] * 2)), "NaN"),
    (dict(errors=np.array([[1.0, np.inf, 0.0]] * 2)), "Inf"),
    (dict(costs=np.array([0, -1, 2])), "non-negative"),
    (dict(costs=np.array([0.0, 1.5, 2.0])), "whole"),
    (dict(fmax=0), "fmax"),
    (dict(budget=2.5), "budget"),
])
def test_input_validation(bad, match):
    args = dict(errors=np.ones((2, 3)), costs=np.array([0, 1, 2]), budget=3, fmax=2)
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        allocate_bits(args["errors"], args["costs"], args["budget"], args["fmax"])


def realistic_instance(rng, h_out, h_in, alpha, decay="power", zero_tail=None, overhead=48):
    """E[i, b] like PrinMix tables: σ_i² · row energy, ~4× less per extra bit, lognormal noise.
    Costs b·(h_in + h_out) + overhead bits (scales/zero points), 0 for width 0."""
    r = min(h_out, h_in)
    i = np.arange(r)
    if decay == "power":
        s2 = (i + 1.0) ** -rng.uniform(0.5, 1.2)
    else:
        s2 = np.exp(-i / (r * rng.uniform(0.05, 0.3)))
    if zero_tail is not None:                  # a low-rank (LoRA-like) delta: σ_i = 0 beyond it
        s2[zero_tail:] = 0.0
    e0 = s2 * rng.lognormal(0, 0.3, r)
    b = WIDTHS[1:]
    rel_mse = (7.0 / (2.0 ** b - 1)) ** 2 / 12
    E = np.empty((r, WIDTHS.size))
    E[:, 0] = e0
    E[:, 1:] = e0[:, None] * rel_mse[None, :] * rng.lognormal(0, 0.15, (r, b.size))
    costs = np.where(WIDTHS > 0, WIDTHS * (h_in + h_out) + overhead, 0).astype(np.int64)
    return E, costs, int(np.floor(alpha * 16 * h_out * h_in))


MEDIUM = [  # (h_out, h_in, alpha, fmax, decay, per-rank overhead bits)
    (40, 300, 1 / 16, 2, "power", 48),
    (64, 200, 1 / 32, 3, "exp", 48),
    (120, 120, 1 / 16, 4, "power", 48),
    (200, 180, 1 / 16, 6, "exp", 48),
    (150, 900, 1 / 32, 4, "power", 24 * (900 // 128 + 1)),   # group-wise scales of V
    (200, 200, 1 / 64, 5, "power", 48),
    (96, 96, 1 / 8, 3, "exp", 24 * (96 // 32 + 1)),
    (180, 60, 1 / 16, 2, "power", 48),
]


@pytest.mark.parametrize("case", range(len(MEDIUM)))
def test_equals_highs_on_medium_realistic_instances(case):
    h_out, h_in, alpha, fmax, decay, overhead = MEDIUM[case]
    rng = np.random.default_rng(100 + case)
    E, costs, budget = realistic_instance(rng, h_out, h_in, alpha, decay, overhead=overhead)
    a = allocate_bits(E, costs, budget, fmax)
    ref = solve_allocation_milp(E, costs, budget, fmax, solver="highs")
    assert ref.certified
    assert_valid(a, E, costs, budget, fmax)
    assert_same_objective(a.objective, ref.objective)


def test_equals_highs_on_unstructured_and_low_rank_instances():
    rng = np.random.default_rng(11)
    costs = np.where(WIDTHS > 0, WIDTHS * 300 + 48, 0)
    for fmax in (2, 4):
        E = rng.random((60, 8))                         # errors unrelated to the width
        budget = 60 * 1200
        a = allocate_bits(E, costs, budget, fmax)
        assert_valid(a, E, costs, budget, fmax)
        assert_same_objective(a.objective, solve_allocation_milp(E, costs, budget, fmax).objective)
    E, costs, budget = realistic_instance(rng, 150, 150, 1 / 16, zero_tail=12)
    a = allocate_bits(E, costs, budget, 3)
    assert_valid(a, E, costs, budget, 3)
    assert_same_objective(a.objective, solve_allocation_milp(E, costs, budget, 3).objective)


@pytest.mark.parametrize("seed", range(3))
def test_equals_highs_with_many_ties_and_odd_costs(seed):
    """Integer errors (massive ties) and costs without common structure, r = 30: too big to enumerate."""
    rng = np.random.default_rng(300 + seed)
    E = rng.integers(0, 6, (30, 5)).astype(np.float64)
    costs = np.concatenate([[0], rng.integers(3, 40, 4)])
    budget = int(rng.integers(30 * 5, 30 * 20))
    fmax = int(rng.integers(1, 4))
    a = allocate_bits(E, costs, budget, fmax)
    assert_valid(a, E, costs, budget, fmax)
    assert_same_objective(a.objective, solve_allocation_milp(E, costs, budget, fmax).objective)


def test_equals_scip_on_a_medium_instance():
    pytest.importorskip("pyscipopt")
    rng = np.random.default_rng(21)
    E, costs, budget = realistic_instance(rng, 100, 300, 1 / 16)
    a = allocate_bits(E, costs, budget, 3)
    ref = solve_allocation_milp(E, costs, budget, 3, solver="scip")
    assert ref.certified
    assert_same_objective(a.objective, ref.objective)


def test_reference_milp_equals_brute_force():
    """The reference formulation itself is Eq. 8 (checked where enumeration is possible)."""
    rng = np.random.default_rng(5)
    for _ in range(12):
        E, costs, budget, fmax = tiny_instance(rng, "random")
        ref = brute_force(E, costs, budget, fmax)
        if ref is None:
            with pytest.raises(BudgetError):
                solve_allocation_milp(E, costs, budget, fmax)
            continue
        m = solve_allocation_milp(E, costs, budget, fmax)
        assert m.certified and m.cost <= budget and len(set(m.choice.tolist())) <= fmax
        assert_same_objective(m.objective, ref)


def test_full_size_instance_is_certified_quickly():
    import time

    rng = np.random.default_rng(9)
    E, costs, budget = realistic_instance(rng, 18944, 3584, 1 / 16)
    t0 = time.perf_counter()
    a = allocate_bits(E, costs, budget, 4)
    elapsed = time.perf_counter() - t0
    assert_valid(a, E, costs, budget, 4)
    # the budget must bind: an unconstrained optimum would spend far more
    assert a.cost > budget - costs.max()
    assert elapsed < 5.0
