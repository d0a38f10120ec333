"""One budget for the whole delta: what differs, what it may cost, and the compressed vocabulary rows.

`--ratio α` (whole-delta mode, the default) means: every byte the delta stores for weights — linear
blobs, compressed vocabulary rows and their row sets, exact norms/biases/new rows, and all their header
entries — is ≤ α × the 16-bit size of what differs from the base:
    decoder linears       whole matrices (as the paper counts them)
    embedding / lm_head   the rows that differ, and rows added to the vocabulary
    norms, biases, …      whole tensors
Config/tokenizer files and the file's own metadata (parameters, base fingerprint) are not weights and are
reported apart. `exact_embeddings=True` keeps the earlier behaviour (α for the linears only; every other
tensor that differs stored exactly) for comparison.

How the budget is spent (decisions):
1. Exact tensors (norms, biases, added vocabulary rows) are paid first, at their real stored size with
   their header entries; they are tiny on real models (SmolLM2: 70 KB of a 17 MB budget). So are the
   header entries of every compressed part, except those of a toy matrix whose entries would exceed a
   quarter of its own budget (format/delta_file.ratio_within_file: a 64×128 matrix's ~400 B of its
   1 KiB at 1/16; no matrix of a real LLM): charging them would leave toy models' linears almost no bits
   and make comparisons on them meaningless. Such a file can end above α; see 5.
2. What is left, B, is shared between the decoder linears (one ratio α' for all of them, as the paper
   does) and the vocabulary parts in proportion to their size (the same ratio for every compressed part),
   or (`--split measured`, PrinMix with calibration) by the KL divergence each part's compression is
   measured to cause on the calibration text; budget_split.py, the rules and why proportional is the
   default (measured). The linears' α' is fixed before the pass, which compresses them one layer at a
   time on the reconstructed model.
3. The vocabulary parts (untied: embedding and lm_head) are compressed after the pass with what the
   linears left (their real spending, not the plan), shared between them in the proportions the measured
   split chose (`--split measured`); by default PrinMix with calibration shares it by one exchange rate
   between their relative errors of Eq. 8 in their calibrated objectives, weighted by their entries
   (vocab_delta.split_budget), and the baselines, which have no error curve here, in proportion to size. A
   tied matrix is one part with both roles in its objective.
4. BitDelta's size is fixed by its format (1 bit per entry + 5 B): its whole delta is ≈ 1/16 + the exact
   tensors' excess, reported as such; ratios below 1/16 are refused as before.
5. A file that ends above α (toy matrices' uncharged header entries, 1.; a part's fixed minimum size
   above its share) is written, and compress warns with both numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..algorithms.budget import budget_bits, prinmix_fixed_overhead_bits
from ..algorithms.compress_matrix import compress_matrix
from ..algorithms.compressed_linear import BLOB_HEADER_BYTES
from ..algorithms.prinmix_config import PrinMixConfig
from ..algorithms.vocab_delta import prinmix_error_curve, row_set_nbytes, split_budget
from ..errors import BudgetError, DeltaRangeError
from ..format.delta_file import (
    DeltaFile,
    dense_header_bytes,
    matrix_header_bytes,
    ratio_within_file,
    rows_header_bytes,
    vocab_header_bytes,
)
from .budget_split import BudgetSplit, EffectProbe, choose_split, linear_alpha_of, vocab_problem
from .tensor_diff import stored_form

__all__ = ["VocabPart", "WholeBudget", "compress_vocab_parts", "plan_whole_budget"]


@dataclass
class VocabPart:
    """The changed rows of one vocabulary matrix [n_rows_final, d]: `changed` int64 [n] existing rows that
    differ (compressed), `added` int64 [m] rows past the base's vocabulary (exact); roles "lookup"/"head"."""

    name: str
    shape: tuple[int, int]
    changed: torch.Tensor
    added: torch.Tensor
    roles: tuple[str, ...]


@dataclass
class WholeBudget:
    """The whole-delta budget, planned before the layer pass (bits unless named otherwise)."""

    alpha: float
    total_bits: int
    linear_params: int                  # entries of the decoder linears (all assumed to differ when planned)
    vocab_params: int                   # entries of the changed existing vocabulary rows (compressed)
    exact_params: int                   # entries of exact tensors: norms, biases, added rows
    exact_bytes: int                    # their stored bytes + header entries
    overhead_bytes: int                 # header entries of the linears, row sets + header entries of the
                                        # compressed vocabulary parts (paid before any blob)
    linear_alpha: float                 # α' of every linear blob (see module docstring, 2.)
    vocab: list[VocabPart] = field(default_factory=list)
    split: BudgetSplit | None = None    # how the compressed bits were shared (budget_split.py)


def _vocab_matrix_names(stack, ft_r, compat) -> list[str]:
    vocab = getattr(ft_r.config.get_text_config(), "vocab_size", None)
    return [n for n in stack.non_layer_tensor_names
            if len(ft_r.shape(n)) == 2 and (n in compat.resized_vocab or ft_r.shape(n)[0] == vocab)]


def _changed_rows(base_t: torch.Tensor, ft_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = min(base_t.shape[0], ft_t.shape[0])
    same = (base_t[:n] == ft_t[:n].to(base_t.dtype)).all(dim=1) & (base_t.dtype == ft_t.dtype)
    return torch.nonzero(~same).flatten(), torch.arange(n, ft_t.shape[0])


def plan_whole_budget(stack, base_r, ft_r, compat, alpha: float, method: str = "prinmix",
                      config: PrinMixConfig | None = None, counts: torch.Tensor | None = None,
                      vocab_share: float | None = None, probe: EffectProbe | None = None,
                      split: str = "proportional") -> WholeBudget:
    """Scan what differs (exact tensors read and compared; linears counted whole) and fix α'.

    method "bitdelta": the size is fixed by its format — report, never refuse. counts: int64 [vocab] token
    counts of the calibration inputs (None: uncalibrated). vocab_share: force the vocabulary parts' share
    of the compressed bits (benchmarks); None: by `split` — "proportional" (one ratio for every compressed
    part) or "measured" (budget_split.py; the effects measured on `probe`)."""
    fixed_size = method == "bitdelta"
    vocab_names = _vocab_matrix_names(stack, ft_r, compat)
    head = stack.output_embedding_name()
    tied = bool(getattr(ft_r, "tied_embeddings", False))
    linear_params = vocab_params = exact_params = exact_bytes = overhead = 0
    parts: list[VocabPart] = []
    smallest: tuple[str, tuple] | None = None   # the linear with the fewest entries: the first a small α' empties
    for i in range(stack.num_layers):
        prefix = stack.layer_prefix(i)
        linears = {prefix + n + ".weight" for n in stack.linear_names(i)}
        for name in stack.layer_tensor_names(i):
            if name in linears:
                shape = tuple(ft_r.shape(name))
                linear_params += math.prod(shape)
                if smallest is None or math.prod(shape) < math.prod(smallest[1]):
                    smallest = (name, shape)
                if ratio_within_file(alpha, name, shape) != alpha:   # not a toy matrix
                    overhead += matrix_header_bytes(name, shape)
                continue
            e, b = _exact_cost(name, base_r, ft_r)
            exact_params, exact_bytes = exact_params + e, exact_bytes + b
    for name in stack.non_layer_tensor_names:
        if name not in vocab_names or name not in base_r:
            e, b = _exact_cost(name, base_r, ft_r)
            exact_params, exact_bytes = exact_params + e, exact_bytes + b
            continue
        base_t, ft_t = base_r.get(name, dtype=None), stored_form(ft_r.get(name, dtype=None), base_r.get(name, dtype=None))
        changed, added = _changed_rows(base_t, ft_t)
        d = int(ft_t.shape[1])
        roles = ("lookup", "head") if tied else (("head",) if name == head else ("lookup",))
        parts.append(VocabPart(name, (int(ft_t.shape[0]), d), changed, added, roles))
        if added.numel():
            exact_params += added.numel() * d
            exact_bytes += added.numel() * (8 + d * ft_t.element_size()) + rows_header_bytes(name)
        if changed.numel():
            vocab_params += changed.numel() * d
            overhead += row_set_nbytes(changed.numel(), int(ft_t.shape[0])) + vocab_header_bytes(name)
    total = budget_bits(alpha, 1, linear_params + vocab_params + exact_params)
    compressed = linear_params + vocab_params
    left = total - 8 * (exact_bytes + overhead)
    if compressed and left <= 0 and not fixed_size:
        raise BudgetError(f"ratio {alpha:g} of the whole delta ({total // 8} B) does not even pay for the tensors "
                          f"stored exactly ({exact_bytes} B: norms, biases, added vocabulary rows) and the "
                          f"header entries ({overhead} B)")
    plan = WholeBudget(alpha, total, linear_params, vocab_params, exact_params, exact_bytes, overhead,
                       alpha, parts)
    if fixed_size or not compressed:
        return plan
    plan.split = choose_split(plan, stack, base_r, ft_r, method, config or PrinMixConfig(), counts, vocab_share,
                              probe, split)
    plan.linear_alpha = linear_alpha_of(plan.split, linear_params, alpha)
    if smallest is not None:
        name, shape = smallest
        blob = budget_bits(ratio_within_file(plan.linear_alpha, name, shape), *shape)
        if blob < 8 * BLOB_HEADER_BYTES:
            raise BudgetError(f"ratio {alpha:g} of the whole delta leaves the decoder linears {plan.linear_alpha:.3g} "
                              f"of their size after the exact tensors ({exact_bytes} B) and header entries "
                              f"({overhead} B): {blob} bits for {name} {shape[0]}x{shape[1]}, less than a blob's "
                              f"{BLOB_HEADER_BYTES} B header; choose a larger --ratio")
    return plan


def _exact_cost(name: str, base_r, ft_r) -> tuple[int, int]:
    """(entries, stored bytes + header entries) of tensor NAME if stored exactly because it differs, else (0, 0)."""
    ft_t = ft_r.get(name, dtype=None)
    if name in base_r:
        base_t = base_r.get(name, dtype=None)
        ft_t = stored_form(ft_t, base_t)
        if base_t.dtype == ft_t.dtype and torch.equal(base_t, ft_t):
            return 0, 0
    return ft_t.numel(), ft_t.numel() * ft_t.element_size() + dense_header_bytes(name, ft_t.ndim)


def compress_vocab_parts(delta: DeltaFile, plan: WholeBudget, base_r, ft_r, method: str, cfg: PrinMixConfig,
                         counts: torch.Tensor | None, head_H: torch.Tensor | None, device) -> dict:
    """Store the planned vocabulary parts in `delta`: added rows exactly (delta.rows), changed rows as one
    compressed [n, d] delta each (delta.vocab), within what the budget leaves after everything else.

    counts: int64 [vocab] token counts of the calibration inputs (None: no calibration — plain Frobenius
    objective); head_H: H = Σ hhᵀ [d, d] of the final normed hidden states (None: no calibration).
    Returns {name: {"budget_bits", "roles", "rows"}} for the stats."""
    for part in plan.vocab:
        if part.added.numel():
            ft_t = stored_form(ft_r.get(part.name, dtype=None), base_r.get(part.name, dtype=None))
            delta.rows[part.name] = (part.added, ft_t[part.added].contiguous(), list(part.shape))
    todo = [p for p in plan.vocab if p.changed.numel()]
    if not todo:
        return {}
    # what is spent: linear blobs, the planned overheads (linear headers, row sets, vocabulary headers) and the
    # exact tensors as stored (with the added rows just put in)
    left = plan.total_bits - 8 * (delta.linear_bytes() + plan.overhead_bytes + delta.weight_bytes()["exact"])
    floor_bits = sum(8 * BLOB_HEADER_BYTES for _ in todo)
    if method == "bitdelta":
        left = max(left, sum(p.changed.numel() * p.shape[1] + 8 * 8 for p in todo))  # fixed size (docstring 4.)
    elif left < floor_bits:
        raise BudgetError(f"ratio {plan.alpha:g}: nothing is left of the whole-delta budget for the "
                          f"{len(todo)} embedding / lm_head row deltas")
    problems = []
    for p in todo:
        problems.append((p, *vocab_problem(p, base_r, ft_r, counts, head_H)))
    sizes = [p.changed.numel() * p.shape[1] for p, *_ in problems]
    measured = plan.split.part_bits if plan.split is not None else None
    if measured and all(p.name in measured for p, *_ in problems):
        # the measured rule's bits per part (budget_split.py), scaled to what the linears really left
        planned = [measured[p.name] for p, *_ in problems]
        budgets = [left * b // max(sum(planned), 1) for b in planned]
    elif method == "prinmix" and len(problems) > 1 and counts is not None:
        # parts weighted by their entries n_p: Σ_p n_p·e_p(B_p), e_p the relative error of Eq. 8 in the part's
        # calibrated objective, at one exchange rate (vocab_delta.split_budget)
        total_w = sum(sizes) or 1
        curves = [lambda b, d=d, H=H, w=w, wp=wp: (wp / total_w) * prinmix_error_curve(d, H, w, b, cfg)
                  for (_, d, H, w), wp in zip(problems, sizes)]
        floor = prinmix_fixed_overhead_bits(cfg.fmax)   # every part keeps a blob of no ranks at least
        budgets = [b + floor for b in split_budget(curves, max(left - floor * len(curves), 0))]
    else:
        budgets = [left * s // sum(sizes) for s in sizes]
    report = {}
    for (p, d_rows, H, w), bits in zip(problems, budgets):
        n, d = d_rows.shape
        ratio = 1 / 16 if method == "bitdelta" else max(bits - 1, 0) / (16 * n * d)
        if method != "bitdelta" and budget_bits(ratio, n, d) < 8 * BLOB_HEADER_BYTES:
            raise BudgetError(f"ratio {plan.alpha:g}: {p.name}'s share of the whole-delta budget ({bits} bits) "
                              f"is below a blob's header")
        try:
            m = compress_matrix(d_rows.to(device), None if H is None else H.to(device), ratio, method, cfg,
                                row_weights=None if w is None else w.to(device))
        except ValueError as e:  # e.g. an entry whose SVD overflows float32
            raise DeltaRangeError(f"{ft_r.path}: cannot compress the changed rows of {p.name!r} ({e})") from None
        bad = m.nonfinite_field()
        if bad is not None:
            raise DeltaRangeError(f"{ft_r.path}: the changed rows of {p.name!r} do not fit {method}'s float16 "
                                  f"fields ({bad} overflows)")
        delta.vocab[p.name] = (p.changed, m.stored_copy(), list(p.shape))
        report[p.name] = {"budget_bits": int(bits), "roles": list(p.roles), "rows": int(n)}
    return report
