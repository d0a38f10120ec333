"""Exact per-rank bit-width allocation: Eq. 8 of the PrinMix paper.

Problem (all costs and the budget in integer bits):

    minimise   Σ_i E[i, s_i]                       s_i ∈ {0..nb-1}, i = 0..r-1
    subject to Σ_i cost[s_i] ≤ budget
               |{s_i}| ≤ fmax                      (a used width 0 counts too)

Algorithm (exact, certified):

1. Cardinality. A solution using ≤ fmax distinct candidates is feasible for every superset of
   them, so it suffices to solve one multiple-choice knapsack (MCKP) per candidate subset T of
   size k = min(fmax, nb) and take the best.
2. Bounds. For any λ ≥ 0, L_T(λ) = Σ_i min_{j∈T} (E_ij + λ c_j) − λ·budget ≤ opt(T) (Lagrangian
   relaxation of the budget row; max_λ L_T equals the LP bound of the MCKP). A cheap bound at the
   multiplier of the full candidate set orders the subsets; subsets whose bound reaches the
   incumbent are pruned, the others get their own multiplier (1-D cutting planes on the concave
   L_T), a greedy feasible solution, and an exact solve if their bound still beats the incumbent.
3. Exact MCKP. With rc_ij = E_ij + λc_j − min_j'(E_ij' + λc_j') ≥ 0 every assignment x obeys
       Σ_i E[i, x_i] = L_T(λ) + Σ_i rc_{i,x_i} + λ·(budget − Σ_i c_{x_i}),
   and the last two terms are ≥ 0 when x is feasible. A solution beating the incumbent UB thus
   only uses items with rc < UB − L_T(λ) (reduced-cost fixing). Because every rank has the same
   cost vector, ranks leaving the same base item for the same target are interchangeable in cost,
   so only the few cheapest (in rc) candidates per (base, target) pair need to stay free. Those
   ranks are solved by a dynamic programme over the exact integer cost offset (no gcd or rounding
   of costs), keeping only Pareto-optimal (cost, value) states and dropping states whose bound
   reaches UB. A subset whose surviving items all lie in an already settled subset is skipped.
   Nothing that could beat the incumbent by more than a relative 1e-10 is ever discarded, hence
   the result is optimal and certified. If the state set grows past `max_states` (pathological,
   e.g. thousands of exactly tied ranks), that subset's reduced problem is handed to an exact MILP
   (HiGHS, zero gap) instead, and `certified` reports whether HiGHS proved it.
Typical cost on Qwen2.5-7B shapes (r = 512…3584, nb = 8): 2–50 ms per matrix.
"""

from __future__ import annotations

import itertools

import numpy as np

from ..errors import BudgetError
from .allocation_milp import solve_mckp_milp
from .allocation_problem import Allocation, min_feasible_budget, validate_allocation_inputs

_REL_TOL = 1e-10          # objective differences below this (relative) count as ties
_MAX_STATES = 4_000_000   # DP states per step before falling back to the MILP


def allocate_bits(errors: np.ndarray, costs: np.ndarray, budget: int, fmax: int,
                  *, max_states: int = _MAX_STATES) -> Allocation:
    """Certified optimum of Eq. 8 (see module docstring).

    errors: float64 [r, nb] error of rank i at candidate j; costs: int64 [nb] bits per rank;
    budget: bits for the whole matrix; fmax: most distinct candidates used (≥ 1).
    Raises BudgetError when even the cheapest candidate on every rank exceeds the budget.
    """
    E, c, budget, fmax = validate_allocation_inputs(errors, costs, budget, fmax)
    r, nb = E.shape
    need = min_feasible_budget(r, c)
    if budget < need:
        raise BudgetError(
            f"budget of {budget} bits is infeasible for {r} ranks: at least {need} bits are "
            f"needed (every rank at its cheapest candidate, {int(c.min())} bits)")
    if r == 0:
        return Allocation(np.zeros(0, np.int64), 0.0, 0, 0.0, True)
    budget = min(budget, r * int(c.max()))       # a larger budget never binds

    order = np.argsort(c, kind="stable")          # work on columns sorted by cost
    Es, cs = E[:, order], c[order]
    k = min(fmax, nb)
    subsets = np.array([s for s in itertools.combinations(range(nb), k)
                        if r * int(cs[s[0]]) <= budget], dtype=np.int64)

    # Cheap bound for every subset at the multiplier of the full candidate set.
    lam_all, _, _ = _lagrangian_dual(Es, cs, budget)
    M_all = Es + lam_all * cs
    quick = M_all[:, subsets].min(axis=2).sum(axis=0) - lam_all * budget

    best_x, best_obj = None, np.inf
    certified = True
    lower = np.inf                  # min over subsets of what is proven about them
    solved = []                     # column bitmasks of subsets proven to hold nothing < incumbent
    for s in np.argsort(quick, kind="stable"):
        T = subsets[s]
        if quick[s] >= best_obj - _tol(best_obj):
            lower = min(lower, quick[s])
            break                   # sorted: every later subset is pruned as well
        T_mask = sum(1 << int(j) for j in T)
        if solved and _covered(M_all[:, T], best_obj - quick[s] + _tol(best_obj), T, solved):
            lower = min(lower, best_obj)    # nothing in T can beat the incumbent (reduced costs at λ_all)
            solved.append(T_mask)
            continue
        ET, cT = Es[:, T], cs[T]
        lam, lb, x = _lagrangian_dual(ET, cT, budget, lam_start=lam_all)
        lb = max(lb, quick[s])
        x = _greedy_fill(ET, cT, x, budget)
        obj = float(ET[np.arange(r), x].sum())
        if obj < best_obj:
            best_obj, best_x = obj, T[x]
        if lb >= best_obj - _tol(best_obj):
            lower = min(lower, lb)
            solved.append(T_mask)
            continue
        x, ok = _solve_mckp_exact(ET, cT, budget, lam, best_obj, max_states, T=T, solved_masks=solved)
        certified &= ok
        if ok:
            solved.append(T_mask)
        if x is not None:
            obj = float(ET[np.arange(r), x].sum())
            if obj < best_obj:
                best_obj, best_x = obj, T[x]
        lower = min(lower, best_obj if ok else lb)

    choice = order[best_x].astype(np.int64)
    cost = int(c[choice].sum())
    objective = float(E[np.arange(r), choice].sum())
    return Allocation(choice, objective, cost, float(min(lower, objective)), bool(certified))


def _tol(value: float) -> float:
    return _REL_TOL * abs(value) if np.isfinite(value) else 0.0


def _evaluate_dual(E, c, budget, lam):
    """L(λ), its subgradient Σ c_x − budget at the cheapest argmin x (columns sorted by cost), x."""
    M = E + lam * c
    x = M.argmin(axis=1)
    total = M[np.arange(M.shape[0]), x].sum()
    return float(total - lam * budget), int(c[x].sum()) - budget, x


def _lagrangian_dual(E, c, budget, lam_start=None, max_iter=100):
    """max_{λ≥0} L(λ) of the MCKP with columns sorted by cost, by 1-D cutting planes (Kelley).

    Returns (λ, L(λ), x) where x is an argmin assignment with Σ c_x ≤ budget (cost-feasible).
    lam_start: a guess of λ (the bracket is searched around it by factors of 2).
    Any λ yields a valid bound, so an early stop only weakens the bound, never the exactness.
    """
    best = [-np.inf, 0.0]

    def point(lam):
        f, g, x = _evaluate_dual(E, c, budget, lam)
        if f > best[0]:
            best[:] = [f, lam]
        return lam, f, g, x

    lo = hi = None                      # points with subgradient > 0 / ≤ 0
    if lam_start is not None and lam_start > 0:
        p = point(lam_start)
        for step in range(7):           # Σ cost of the argmin falls as λ grows: walk to a sign change
            if p[2] > 0:
                lo = p
            else:
                hi = p
            if (lo is not None and hi is not None) or step == 6:
                break
            p = point(p[0] * (2.0 if p[2] > 0 else 0.5))
    if lo is None:
        lo = point(0.0)
        if lo[2] <= 0:
            return 0.0, lo[1], lo[3]    # unconstrained optimum fits: exact
    if hi is None:
        cheap = c == c[0]
        e_cheap = E[:, cheap].min(axis=1)
        dear = ~cheap
        lam_max = 0.0
        if dear.any():
            lam_max = float(np.max((e_cheap[:, None] - E[:, dear]) / (c[dear] - c[0])))
        hi = point(max(2.0 * lam_max, 2.0 * lo[0], 1e-300))
        while hi[2] > 0:                # safety for float edge cases
            hi = point(hi[0] * 2.0)
    (lam_lo, f_lo, g_lo, _), (lam_hi, f_hi, g_hi, x_hi) = lo, hi
    for _ in range(max_iter):
        if g_hi == 0:
            break
        lam = (f_hi - f_lo + g_lo * lam_lo - g_hi * lam_hi) / (g_lo - g_hi)
        if not lam_lo < lam < lam_hi:
            break
        model = f_lo + g_lo * (lam - lam_lo)
        _, f, g, x = point(lam)
        if g > 0:
            lam_lo, f_lo, g_lo = lam, f, g
        else:
            lam_hi, f_hi, g_hi, x_hi = lam, f, g, x
        if f >= model - 1e-15 * (abs(model) + abs(lam * budget)):
            break                       # the model is tight: λ is optimal
    return best[1], best[0], x_hi


def _greedy_fill(E, c, x, budget, max_moves=64):
    """Improve a feasible assignment by repeatedly taking the best error drop that still fits."""
    x = x.copy()
    rows = np.arange(E.shape[0])
    spent = int(c[x].sum())
    for _ in range(max_moves):
        gain = E[rows, x][:, None] - E
        ok = (c[None, :] - c[x][:, None] <= budget - spent) & (gain > 0)
        if not ok.any():
            break
        i, j = np.unravel_index(np.argmax(np.where(ok, gain, -np.inf)), gain.shape)
        spent += int(c[j] - c[x[i]])
        x[i] = j
    return x


def _solve_mckp_exact(E, c, budget, lam, upper, max_states, T=None, solved_masks=()):
    """Best assignment of the MCKP (columns of E, costs c) if one beats `upper` (else None), exact.

    Reduced-cost fixing at multiplier λ, then a Pareto DP over the exact integer cost offset of the
    ranks that stay free. Returns (x or None, certified).
    T: the parent-table columns of E's columns; solved_masks: bitmasks of parent columns of
    subsets already settled against an incumbent ≥ `upper`. If every item an improving solution
    may use lies in one of those, it would have been found there: nothing to do.
    """
    r = E.shape[0]
    rows = np.arange(r)
    M = E + lam * c
    base = M.argmin(axis=1)
    rc = M - M[rows, base][:, None]
    lb = float(M[rows, base].sum() - lam * budget)
    threshold = upper - lb + _tol(upper)          # a better solution has Σ rc + λ·slack below this
    if threshold <= 0:
        return None, True
    allowed = _reduce_moves(rc, base, rc < threshold, threshold)
    if T is not None and solved_masks and _within_solved(allowed, T, solved_masks):
        return None, True
    free = np.flatnonzero(allowed.sum(axis=1) > 1)
    slack0 = budget - int(c[base].sum())          # budget left after the fixed (base) choices
    if free.size == 0:
        return (base if slack0 >= 0 else None), True
    # ranks whose cheapest move is dearest first: they rarely move, so the state set stays small
    move_rc = np.where(allowed[free] & (rc[free] > 0), rc[free], np.inf)
    move_rc[np.arange(free.size), base[free]] = np.inf
    free = free[np.argsort(-move_rc.min(axis=1), kind="stable")]

    opts = [np.flatnonzero(allowed[i]) for i in free]
    d_cost = [c[o] - c[base[i]] for i, o in zip(free, opts)]
    d_rc = [rc[i, o] for i, o in zip(free, opts)]
    min_future = np.zeros(free.size + 1, np.int64)   # Σ of the smallest / largest offsets still to come
    max_future = np.zeros(free.size + 1, np.int64)
    for t in range(free.size - 1, -1, -1):
        min_future[t] = min_future[t + 1] + d_cost[t].min()
        max_future[t] = max_future[t + 1] + d_cost[t].max()

    state_dc = np.zeros(1, np.int64)     # Σ cost offset of the free ranks so far
    state_v = np.zeros(1)                # Σ reduced cost so far
    back = []
    for t in range(free.size):
        n_opt = d_cost[t].size
        dc = (state_dc[:, None] + d_cost[t]).ravel()
        v = (state_v[:, None] + d_rc[t]).ravel()
        # feasible completion exists, and Σ rc + λ·(least final slack) stays below the threshold
        keep = (dc <= slack0 - min_future[t + 1]) & (
            v + lam * np.maximum(slack0 - max_future[t + 1] - dc, 0) < threshold)
        idx = np.flatnonzero(keep)
        if idx.size == 0:
            return None, True
        dc, v = dc[idx], v[idx]
        # Pareto filter on (dc ↓ better, w = v − λ·dc ↓ better): scan by w, keep record-low dc
        srt = np.argsort(v - lam * dc, kind="stable")
        dcs = dc[srt]
        front = np.ones(srt.size, bool)
        front[1:] = dcs[1:] < np.minimum.accumulate(dcs)[:-1]
        srt = srt[front]
        if srt.size > max_states:
            return _solve_reduced_milp(E, c, budget, base, free, opts)
        state_dc, state_v = dc[srt], v[srt]
        sel = idx[srt]
        back.append((sel // n_opt, sel % n_opt))

    w = state_v - lam * state_dc
    feasible = state_dc <= slack0
    if not feasible.any():
        return None, True
    s = int(np.flatnonzero(feasible)[np.argmin(w[feasible])])
    x = base.copy()
    for t in range(free.size - 1, -1, -1):
        parent, option = back[t]
        x[free[t]] = opts[t][option[s]]
        s = int(parent[s])
    return x, True


def _within_solved(allowed, T, solved_masks) -> bool:
    """Do the columns with an allowed item (bool [r, k]; column j ↔ parent column T[j]) all lie
    in one settled subset (bitmask of parent columns)?"""
    used = sum(1 << int(T[j]) for j in np.flatnonzero(allowed.any(axis=0)))
    return any(used & ~m == 0 for m in solved_masks)


def _covered(M, threshold, T, solved_masks) -> bool:
    """Reduced-cost test with any λ: M = E_T + λ·c_T [r, k], threshold = incumbent − L_T(λ) (+ tol).
    True if every improving solution of subset T would lie inside an already settled subset."""
    if threshold <= 0:
        return True
    base = M.argmin(axis=1)
    rc = M - M[np.arange(M.shape[0]), base][:, None]
    return _within_solved(_reduce_moves(rc, base, rc < threshold, threshold), T, solved_masks)


def _reduce_moves(rc, base, allowed, threshold):
    """Drop moves no improving solution needs: bool [r, k] ⊆ allowed (base items stay allowed).

    An improving solution moves at most n_dev[a] ranks off base item a, n_dev[a] = the largest n
    with (sum of the n smallest cheapest-move reduced costs of base-a ranks) < threshold. All ranks
    share the cost vector, so moving an unmoved rank i' instead of rank i from a to item b changes
    neither the cost nor, when rc_i'b ≤ rc_ib, worsens the objective: some optimum therefore moves
    a → b only ranks among the n_dev[a] smallest rc_·b of base a (ties broken by rank index).
    """
    r, k = rc.shape
    move_rc = np.where(allowed, rc, np.inf)
    move_rc[np.arange(r), base] = np.inf
    cheapest_move = move_rc.min(axis=1)
    movable = np.flatnonzero(np.isfinite(cheapest_move))
    if movable.size == 0:
        return allowed
    # per base item a: at most n_dev[a] ranks can leave a (sum of their cheapest moves < threshold)
    n_dev = np.zeros(k, np.int64)
    for a in np.unique(base[movable]):
        smallest = np.sort(cheapest_move[movable[base[movable] == a]])
        n_dev[a] = np.searchsorted(np.cumsum(smallest), threshold, side="left")
    kept = np.zeros_like(allowed)
    for b in range(k):
        col = move_rc[:, b]
        cand = np.flatnonzero(np.isfinite(col))
        if cand.size == 0:
            continue
        order = cand[np.lexsort((cand, col[cand], base[cand]))]   # by base, then rc, then index
        group_start = np.searchsorted(base[order], base[order], side="left")
        rank_in_group = np.arange(order.size) - group_start
        kept[order[rank_in_group < n_dev[base[order]]], b] = True
    kept[np.arange(r), base] = True
    return kept


def _solve_reduced_milp(E, c, budget, base, free, opts):
    """Fallback: the MCKP restricted to the free ranks' allowed items, solved by HiGHS at zero gap."""
    fixed = np.ones(E.shape[0], bool)
    fixed[free] = False
    rest = budget - int(c[base[fixed]].sum())
    x_free, ok = solve_mckp_milp(E[free], c, rest, opts)
    if x_free is None:
        return None, ok
    x = base.copy()
    x[free] = x_free
    return x, ok
