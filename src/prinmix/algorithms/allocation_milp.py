"""Reference MILP of Eq. 8 exactly as the PrinMix paper states it (for tests and benchmarks).

    min  Σ_ij E_ij S_ij
    s.t. Σ_j S_ij = 1 (each rank i one candidate),  S_ij ≤ f_j,  Σ_j f_j ≤ fmax,
         Σ_ij c_j S_ij ≤ budget (bits),  S ∈ {0,1}^{r×nb},  f ∈ {0,1}^{nb}

solved by HiGHS (scipy.optimize.milp) or SCIP (pyscipopt) at zero relative and absolute gap.
The objective is multiplied by one positive constant for the solver (so that its absolute
tolerances are negligible); the reported objective is recomputed from E. Solvers are imported
lazily; the fast solver lives in allocation.py.
"""

from __future__ import annotations

import time
import warnings

import numpy as np

from ..errors import BudgetError
from .allocation_problem import Allocation, min_feasible_budget, validate_allocation_inputs

_OBJECTIVE_SUM = 1e6   # solver sees E scaled so that Σ_i max_j E_ij = 1e6


def _objective_scale(E: np.ndarray) -> float:
    total = float(np.abs(E).max(axis=1).sum()) if E.size else 0.0
    return _OBJECTIVE_SUM / total if total > 0 else 1.0


def solve_allocation_milp(errors, costs, budget, fmax, solver: str = "highs",
                          time_limit: float | None = None, stats: dict | None = None) -> Allocation:
    """Eq. 8 as a 0/1 MILP. solver: "highs" or "scip"; time_limit in seconds (None: none; SCIP
    counts CPU seconds, HiGHS wall-clock seconds).

    certified is True only when the solver proves optimality at zero gap; on a time-out the best
    solution found is returned with certified=False and the solver's dual bound as lower_bound.
    `stats` (optional dict) receives status, solve_seconds (solver wall time only),
    solve_cpu_seconds (process CPU time of the solve), build_seconds (model building).
    Raises BudgetError when no assignment fits (also when the solver finds none in time).
    """
    E, c, budget, fmax = validate_allocation_inputs(errors, costs, budget, fmax)
    r, nb = E.shape
    stats = stats if stats is not None else {}
    need = min_feasible_budget(r, c)
    if budget < need:
        raise BudgetError(f"budget of {budget} bits is infeasible for {r} ranks: at least {need} bits are needed")
    if r == 0:
        stats.update(status="optimal", solve_seconds=0.0, solve_cpu_seconds=0.0, build_seconds=0.0)
        return Allocation(np.zeros(0, np.int64), 0.0, 0, 0.0, True)
    scale = _objective_scale(E)
    if solver == "highs":
        S, dual, status = _solve_highs(E * scale, c, budget, fmax, time_limit, stats)
    elif solver == "scip":
        S, dual, status = _solve_scip(E * scale, c, budget, fmax, time_limit, stats)
    else:
        raise ValueError(f"unknown solver {solver!r}: use 'highs' or 'scip'")
    stats["status"] = status
    if S is None:
        raise BudgetError(f"{solver} found no feasible allocation (status {status})")
    choice = np.argmax(S, axis=1).astype(np.int64)
    objective = float(E[np.arange(r), choice].sum())
    cost = int(c[choice].sum())
    certified = status == "optimal" and cost <= budget and len(set(choice.tolist())) <= fmax
    lower = objective if certified else (dual / scale if dual is not None else -np.inf)
    return Allocation(choice, objective, cost, float(min(lower, objective)), bool(certified))


def _eq8_matrix(r: int, nb: int, c: np.ndarray):
    """Constraint rows of Eq. 8 over x = [S.ravel() (row-major), f]: assignment, linking, count, budget."""
    from scipy.sparse import coo_matrix

    n_s = r * nb
    s_idx = np.arange(n_s)
    rows = [np.repeat(np.arange(r), nb)]                       # Σ_j S_ij = 1
    cols = [s_idx]
    vals = [np.ones(n_s)]
    rows += [r + s_idx, r + s_idx]                             # S_ij − f_j ≤ 0
    cols += [s_idx, n_s + np.tile(np.arange(nb), r)]
    vals += [np.ones(n_s), -np.ones(n_s)]
    rows += [np.full(nb, r + n_s), np.full(n_s, r + n_s + 1)]  # Σ f ≤ fmax, Σ c S ≤ budget
    cols += [n_s + np.arange(nb), s_idx]
    vals += [np.ones(nb), np.tile(c.astype(np.float64), r)]
    A = coo_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                   shape=(r + n_s + 2, n_s + nb)).tocsr()
    return A


def _solve_highs(Es, c, budget, fmax, time_limit, stats):
    from scipy.optimize import LinearConstraint, milp

    t0 = time.perf_counter()
    r, nb = Es.shape
    n_s = r * nb
    A = _eq8_matrix(r, nb, c)
    lo = np.concatenate([np.ones(r), np.full(n_s, -np.inf), [-np.inf, -np.inf]])
    hi = np.concatenate([np.ones(r), np.zeros(n_s), [fmax, budget]])
    obj = np.concatenate([Es.ravel(), np.zeros(nb)])
    options = {"mip_rel_gap": 0.0, "mip_abs_gap": 0.0, "presolve": True}
    if time_limit is not None:
        options["time_limit"] = float(time_limit)
    stats["build_seconds"] = time.perf_counter() - t0
    t0, c0 = time.perf_counter(), time.process_time()
    with warnings.catch_warnings():          # mip_abs_gap is passed to HiGHS verbatim
        warnings.simplefilter("ignore", RuntimeWarning)
        res = milp(obj, integrality=np.ones(n_s + nb), bounds=(0, 1),
                   constraints=LinearConstraint(A, lo, hi), options=options)
    stats["solve_seconds"] = time.perf_counter() - t0
    stats["solve_cpu_seconds"] = time.process_time() - c0
    status = {0: "optimal", 1: "timelimit", 2: "infeasible"}.get(res.status, f"status {res.status}")
    if res.x is None:
        return None, getattr(res, "mip_dual_bound", None), status
    S = np.round(res.x[:n_s]).reshape(r, nb)
    return S, getattr(res, "mip_dual_bound", None), status


def _solve_scip(Es, c, budget, fmax, time_limit, stats):
    from pyscipopt import Model, quicksum

    t0 = time.perf_counter()
    r, nb = Es.shape
    m = Model("prinmix_eq8")
    m.hideOutput()
    m.setParam("limits/gap", 0.0)
    m.setParam("limits/absgap", 0.0)
    if time_limit is not None:
        m.setParam("timing/clocktype", 1)          # CPU seconds: fair on a shared machine
        m.setParam("limits/time", float(time_limit))
    S = [[m.addVar(vtype="B", obj=float(Es[i, j])) for j in range(nb)] for i in range(r)]
    f = [m.addVar(vtype="B") for _ in range(nb)]
    for i in range(r):
        m.addCons(quicksum(S[i]) == 1)
        for j in range(nb):
            m.addCons(S[i][j] <= f[j])
    m.addCons(quicksum(f) <= fmax)
    cf = [int(x) for x in c]
    m.addCons(quicksum(cf[j] * S[i][j] for i in range(r) for j in range(nb)) <= budget)
    stats["build_seconds"] = time.perf_counter() - t0
    t0, c0 = time.perf_counter(), time.process_time()
    m.optimize()
    stats["solve_seconds"] = time.perf_counter() - t0
    stats["solve_cpu_seconds"] = time.process_time() - c0
    status = m.getStatus()
    dual = m.getDualbound()
    if m.getNSols() == 0:
        return None, dual, status
    sol = m.getBestSol()
    vals = np.array([[sol[S[i][j]] for j in range(nb)] for i in range(r)])
    return np.round(vals), dual, status


def solve_mckp_milp(E: np.ndarray, c: np.ndarray, budget: int, options_per_rank):
    """Exact MCKP (no cardinality row) over the allowed columns of each rank, by HiGHS at zero gap.

    Used by allocate_bits as a fallback on pathological instances. Returns (choice int64 [r] or
    None if infeasible, certified)."""
    from scipy.optimize import LinearConstraint, milp
    from scipy.sparse import coo_matrix

    r = E.shape[0]
    rank_of = np.concatenate([np.full(len(o), i) for i, o in enumerate(options_per_rank)])
    col_of = np.concatenate([np.asarray(o) for o in options_per_rank])
    n = rank_of.size
    scale = _objective_scale(E)
    A = coo_matrix((np.concatenate([np.ones(n), c[col_of].astype(np.float64)]),
                    (np.concatenate([rank_of, np.full(n, r)]), np.concatenate([np.arange(n)] * 2))),
                   shape=(r + 1, n)).tocsr()
    lo = np.concatenate([np.ones(r), [-np.inf]])
    hi = np.concatenate([np.ones(r), [budget]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = milp(E[rank_of, col_of] * scale, integrality=np.ones(n), bounds=(0, 1),
                   constraints=LinearConstraint(A, lo, hi),
                   options={"mip_rel_gap": 0.0, "mip_abs_gap": 0.0})
    if res.status == 2:
        return None, True
    if res.x is None:
        return None, False
    picked = np.round(res.x) > 0.5
    choice = np.full(r, -1, np.int64)
    choice[rank_of[picked]] = col_of[picked]
    ok = res.status == 0 and np.all(choice >= 0) and int(c[choice].sum()) <= budget
    return choice, bool(ok)
