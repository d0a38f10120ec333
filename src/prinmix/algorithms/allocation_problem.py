"""The Eq. 8 allocation problem shared by its solvers (allocation.py: exact, certified; allocation_milp.py:
a MILP reference): input validation, the smallest feasible budget, and the result type.

Inputs: errors E float [r, nb] (Eq. 5's weighted error of rank i at candidate width j), costs int [nb]
(stored bits of one rank at each width), budget (bits), fmax (distinct widths allowed).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np

__all__ = ["Allocation", "min_feasible_budget", "validate_allocation_inputs"]


@dataclass(frozen=True, eq=False)
class Allocation:
    """Result of Eq. 8. choice: int64 [r] column of `errors` per rank; objective = Σ errors[i, choice[i]];
    cost = Σ costs[choice] in bits (≤ budget); lower_bound: proven bound on the optimum;
    certified: the objective is proven optimal (to a relative 1e-10)."""

    choice: np.ndarray
    objective: float
    cost: int
    lower_bound: float
    certified: bool


def validate_allocation_inputs(errors, costs, budget, fmax):
    """Checks and converts the inputs of Eq. 8 → (E float64 [r, nb], c int64 [nb], budget int, fmax int)."""
    E = np.asarray(errors)
    if E.ndim != 2:
        raise ValueError(f"errors must be a 2-D array [ranks, candidates], got shape {E.shape}")
    if not (np.issubdtype(E.dtype, np.floating) or np.issubdtype(E.dtype, np.integer)):
        raise ValueError(f"errors must be numeric, got dtype {E.dtype}")
    E = E.astype(np.float64)
    r, nb = E.shape
    if nb < 1:
        raise ValueError("errors must have at least one candidate column")
    if not np.all(np.isfinite(E)):
        raise ValueError("errors contains NaN or Inf")
    c = np.asarray(costs)
    if c.ndim != 1 or c.shape[0] != nb:
        raise ValueError(f"costs must have shape ({nb},) to match errors {E.shape}, got {c.shape}")
    if np.issubdtype(c.dtype, np.floating):
        if not np.all(np.isfinite(c)) or np.any(c != np.round(c)):
            raise ValueError("costs must be whole numbers of bits")
    elif not np.issubdtype(c.dtype, np.integer):
        raise ValueError(f"costs must be integers (bits), got dtype {c.dtype}")
    if np.any(c < 0):
        raise ValueError(f"costs must be non-negative, got {c.tolist()}")
    c = c.astype(np.int64)
    if r * int(c.max()) >= 2**62:
        raise ValueError("ranks × largest cost overflows 62-bit integers")
    if isinstance(budget, bool) or not isinstance(budget, (numbers.Integral, float, np.floating)):
        raise ValueError(f"budget must be an integer number of bits, got {budget!r}")
    if not isinstance(budget, numbers.Integral):
        if not np.isfinite(budget) or float(budget) != int(budget):
            raise ValueError(f"budget must be an integer number of bits, got {budget!r}")
    budget = int(budget)
    if isinstance(fmax, bool) or not isinstance(fmax, numbers.Integral):
        raise ValueError(f"fmax must be an integer, got {fmax!r}")
    fmax = int(fmax)
    if fmax < 1:
        raise ValueError(f"fmax must be ≥ 1, got {fmax}")
    return E, c, budget, fmax


def min_feasible_budget(r: int, costs: np.ndarray) -> int:
    """Smallest budget (bits) for which Eq. 8 has a solution: every rank at the cheapest candidate."""
    return r * int(np.min(costs)) if r else 0
