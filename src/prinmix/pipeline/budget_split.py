"""How the whole-delta budget is shared between the decoder linears and the vocabulary parts: one exchange rate.

The bits left for compressed content, B (the whole budget less exact tensors and header entries), go to
parts p — the decoder linears as one group at a common ratio α' (the paper's rule among linears), and each
compressed vocabulary part (embedding / lm_head changed rows, vocab_delta.py) — so as to

    minimise  Σ_p g_p² · e_p(B_p)   subject to   Σ_p B_p = B,

e_p(B) = J_p(B) / J_p(0) the part's *relative* error at B bits — the fraction of its fine-tuning change
that compression loses, in its own objective (Eq. 8 with Eq. 5's width errors: vocab_delta.
prinmix_error_curve) — and g_p² the part's measured effect on the output: the mean squared change of the
logits when the part alone is put back to the base, ‖z_ft − z_ft∖p‖² (a streamed forward of a few
calibration sequences per part). At the optimum every part's marginal weighted error reduction per bit is
one exchange rate λ (the Lagrange multiplier Eq. 8 has inside each matrix), found by split_budget.

Why this rule (decisions):
- e_p makes different error units comparable (a logit error, an input-vector error, a layer output error
  each become "the share of this part's change that is lost"); g_p² converts that share back into what a
  user sees — logits — to first order: losing the fraction e of a part's change loses about e of its
  effect (PrinMix drops the tail of the change's spectrum and quantises the rest: the residual lies in
  the change's own directions). Measured, because the alternatives are not: an lm_head error reaches the
  logits unattenuated while a layer's error passes the rest of the network; weighting every entry alike
  (n_p, a size-proportional rule) gave lm_head half its proportional share on the demo model and 5× its
  logit error (0.024 vs 0.0044).
- The linears' curves are needed before the layer pass (their budget is fixed before they are compressed
  one by one on the reconstructed model), so they are estimated then, in their calibrated objective:
  the probe's pass over the fine-tune captures H = XXᵀ of the linears of SAMPLE_LAYERS layers spread
  over the depth (and the head's H), on EFFECT_SEQUENCES calibration sequences; the group's curve is the
  entry-weighted mean of theirs, and its g² reverts all linears at once. The Frobenius objective (H = I)
  is no stand-in: on the demo model it puts a linear's relative error at 1/16 near 0.02 where the
  calibrated one is < 0.001, and the split then starved the vocabulary rows. The vocabulary parts use
  their objective (token-count row weights for the lookup role, the probe's head H for the head role);
  they are compressed at the end with the full calibration set's counts and H.
- Without calibration inputs (no g² or H to measure) the objectives are Frobenius and every part is
  weighted by its entries n_p, which reduces to the paper's uniform α when all curves coincide. Methods without a PrinMix error curve here
  (Delta-CoMe, low-rank) share B in proportion to entries (one ratio for all parts); BitDelta's size is
  fixed by its format.
The benchmark (benchmarks/bench_real_pair.py `:share=S` runs) measures what other shares give.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..algorithms.budget import budget_bits, prinmix_fixed_overhead_bits
from ..algorithms.prinmix_config import PrinMixConfig
from ..algorithms.vocab_delta import lookup_weights, prinmix_error_curve, split_budget
from ..calibration.hessians import capture_hessians
from ..calibration.layer_inputs import run_layer
from .tensor_diff import linear_delta

__all__ = ["SAMPLE_LAYERS", "BudgetSplit", "EffectProbe", "exchange_split", "linear_alpha_of", "sample_layers"]

SAMPLE_LAYERS = 4      # layers whose linears estimate the linear group's error curve
EFFECT_SEQUENCES = 8   # calibration sequences of the probe (g_p², the sampled layers' and the head's H)
CURVE_POINTS = 17      # budgets each curve is evaluated at (linear interpolation in between)
SPLIT_GRID = 128       # budget levels of the split (B/128 resolution)


@dataclass
class BudgetSplit:
    """The compressed bits B and the linears' share of them (the vocabulary parts get the rest)."""

    rule: str             # "exchange" (error curves), "proportional" or "fixed share"
    compressed_bits: int  # B
    linear_bits: int      # the linear group's B_lin
    vocab_share: float    # 1 − B_lin / B
    weights: dict | None = None   # {"linears" | vocabulary name: g_p² (or n_p)} of the exchange rule


@dataclass
class EffectProbe:
    """Where g_p² is measured: calibration token ids [n, seq] (the first EFFECT_SEQUENCES are used)."""

    ids: torch.Tensor
    device: torch.device | str = "cpu"
    batch_size: int = 8


def sample_layers(n_layers: int, k: int = SAMPLE_LAYERS) -> list[int]:
    """k layer indices spread evenly over [0, n_layers) (first and last included), unique and sorted."""
    if n_layers <= k:
        return list(range(n_layers))
    return sorted({round(j * (n_layers - 1) / (k - 1)) for j in range(k)})


class _RevertedReader:
    """The fine-tune's reader with tensors put back to the base: `from_base` maps a name to None (the whole
    tensor) or to row ids int64 [n] (those rows only — a vocabulary matrix keeps its added rows)."""

    def __init__(self, ft_r, base_r, from_base: dict) -> None:
        self._ft, self._base, self._from_base = ft_r, base_r, from_base

    def get(self, name: str, *args, **kwargs) -> torch.Tensor:
        if name not in self._from_base:
            return self._ft.get(name, *args, **kwargs)
        rows = self._from_base[name]
        if rows is None:
            return self._base.get(name, *args, **kwargs)
        out = self._ft.get(name, *args, **kwargs).clone()
        out[rows] = self._base.get(name, *args, **kwargs)[rows].to(out.dtype)
        return out

    def __contains__(self, name: str) -> bool:
        return name in self._ft

    def __getattr__(self, attribute: str):
        return getattr(self._ft, attribute)


@torch.no_grad()
def _streamed_logits(stack, reader, ids: torch.Tensor, device, batch_size: int,
                     hessians: dict | None = None) -> torch.Tensor:
    """Logits [n, seq, vocab] of the model `reader` holds, one layer in memory at a time. hessians: a dict
    to fill with {weight name: H = XXᵀ} of the linears of the sample_layers() layers and "head" (the final
    normed states' H)."""
    inputs = stack.embed(reader, ids, device, batch_size)
    sampled = set(sample_layers(stack.num_layers)) if hessians is not None else set()
    for i in range(stack.num_layers):
        layer = stack.build_layer(i, stack.read_layer_state(reader, i), device)
        if i in sampled:
            prefix = stack.layer_prefix(i)
            hessians.update({prefix + n + ".weight": st.H.cpu()
                             for n, st in capture_hessians(layer, inputs, batch_size).items()})
        inputs = inputs.with_hidden(run_layer(layer, inputs, batch_size))
        layer = None
    if hessians is not None and stack.output_embedding_name() is not None:
        hessians["head"] = stack.head_hessian(reader, ids, inputs.hidden, device, batch_size).cpu()
    return stack.logits(reader, ids, inputs.hidden, device, batch_size)


@dataclass
class _Probe:
    """What one streamed pass of the fine-tune (and one per reverted group) measured."""

    effects: list[float]          # g² per group
    hessians: dict                # {weight name | "head": H} on the probe sequences


def _probe(stack, base_r, ft_r, groups: list[dict], probe: EffectProbe) -> _Probe:
    """g² = mean over positions of ‖z_ft − z_ft∖G‖² for each group G of tensor names put back to the base,
    and the fine-tune's Hessians of the sampled layers' linears and of the head on the same sequences."""
    ids = probe.ids[:EFFECT_SEQUENCES]
    hessians: dict = {}
    z_ft = _streamed_logits(stack, ft_r, ids, probe.device, probe.batch_size, hessians)
    effects = []
    for group in groups:
        z = _streamed_logits(stack, _RevertedReader(ft_r, base_r, group), ids, probe.device, probe.batch_size)
        effects.append(float(((z - z_ft) ** 2).sum(-1).mean()))
    return _Probe(effects, hessians)


def _interpolated(points: np.ndarray, values: np.ndarray) -> Callable:
    return lambda levels: np.interp(np.asarray(levels, dtype=np.float64), points, values)


def _levels(total_bits: int) -> np.ndarray:
    """0 and total·2^(−j/2), j = 0 … CURVE_POINTS−2: dense where error curves fall fastest."""
    return np.array([0.0] + [total_bits * 2.0 ** (-j / 2) for j in range(CURVE_POINTS - 2, -1, -1)])


def _linear_group_curve(stack, base_r, ft_r, linear_params: int, total_bits: int, cfg: PrinMixConfig,
                        hessians: dict):
    """e(B_lin): entry-weighted mean relative error of the sampled linears at α' = B_lin / 16 n_lin, each in
    its calibrated objective (H from `hessians`; Frobenius, H = I, without), as a callable of B_lin (bits);
    None when no sampled linear differs."""
    levels = _levels(total_bits)
    alphas = levels / (16 * linear_params)
    acc, weight = np.zeros(len(levels)), 0
    for i in sample_layers(stack.num_layers):
        prefix = stack.layer_prefix(i)
        for short in stack.linear_names(i):
            name = prefix + short + ".weight"
            if name not in base_r:
                continue
            d = linear_delta(name, base_r, ft_r)
            if d is None:
                continue
            h_out, h_in = d.shape
            budgets = [budget_bits(float(a), h_out, h_in) for a in alphas]
            try:
                curve = prinmix_error_curve(d, hessians.get(name), None, budgets, cfg)
            except (ValueError, RuntimeError):   # e.g. an entry overflowing float32: the pass says so, in one line
                continue
            if np.all(np.isfinite(curve)):
                acc += h_out * h_in * curve
                weight += h_out * h_in
    if not weight:
        return None
    return _interpolated(levels, acc / weight)


def _vocab_curve(part, base_r, ft_r, counts, head_H: torch.Tensor | None, total_bits: int, cfg: PrinMixConfig):
    """e_p(B) of one vocabulary part in its objective (vocab_delta.py: token-count row weights for the lookup
    role, head_H for the head role; Frobenius without calibration), as a callable of B."""
    base_t = base_r.get(part.name, dtype=torch.float32)
    ft_t = ft_r.get(part.name, dtype=torch.float32)
    d_rows = ft_t[part.changed] - base_t[part.changed]
    del base_t, ft_t
    n, d = d_rows.shape
    weights = H = None
    if counts is not None and "lookup" in part.roles:
        c = torch.zeros(part.shape[0], dtype=torch.float64)
        c[: min(counts.numel(), part.shape[0])] = counts[: part.shape[0]].double()
        weights = lookup_weights(c)[part.changed].float()
    if head_H is not None and "head" in part.roles:
        H = head_H.float()
    elif weights is not None:
        H = torch.zeros(d, d)       # lookup only: no head term
    levels = _levels(total_bits)
    return _interpolated(levels, prinmix_error_curve(d_rows, H, weights, [int(v) for v in levels], cfg))


def _linear_names(stack) -> list[str]:
    return [stack.layer_prefix(i) + n + ".weight" for i in range(stack.num_layers) for n in stack.linear_names(i)]


def exchange_split(plan, stack, base_r, ft_r, method: str, cfg: PrinMixConfig, counts: torch.Tensor | None,
                   vocab_share: float | None = None, probe: EffectProbe | None = None) -> BudgetSplit:
    """Share plan's compressed bits between the linear group and the vocabulary parts (module docstring).

    plan: a whole_budget.WholeBudget; counts: int64 [vocab] calibration token counts (None: uncalibrated,
    Frobenius objectives); vocab_share: force the vocabulary parts' share of B (benchmarks), None: by error;
    probe: where the effects g_p² are measured (None: weights n_p)."""
    compressed = plan.total_bits - 8 * (plan.exact_bytes + plan.overhead_bytes)
    todo = [p for p in plan.vocab if p.changed.numel()]
    entries = plan.linear_params + plan.vocab_params
    if compressed <= 0 or not todo or not plan.linear_params:
        return BudgetSplit("proportional", max(compressed, 0), max(compressed, 0) if not todo else 0,
                           0.0 if not todo else 1.0)
    if vocab_share is not None:
        share = min(max(float(vocab_share), 0.0), 1.0)
        return BudgetSplit("fixed share", compressed, int(compressed * (1 - share)), share)
    proportional = BudgetSplit("proportional", compressed, compressed * plan.linear_params // entries,
                               plan.vocab_params / entries)
    if method != "prinmix":
        return proportional
    # every vocabulary part keeps at least its blob's fixed fields (a blob of no ranks), outside the split
    shared = compressed - len(todo) * prinmix_fixed_overhead_bits(cfg.fmax)
    if shared <= 0:
        return proportional
    labels = ["linears"] + [p.name for p in todo]
    if probe is not None:
        groups = [{n: None for n in _linear_names(stack) if n in base_r}] + [{p.name: p.changed} for p in todo]
        measured = _probe(stack, base_r, ft_r, groups, probe)
        weights, hessians = measured.effects, measured.hessians
        if counts is not None:   # lookup weights count the probe's positions as the head's H does
            counts = counts * (EFFECT_SEQUENCES * probe.ids.shape[1] / max(float(counts.sum()), 1.0))
    else:
        weights = [float(plan.linear_params)] + [float(p.changed.numel() * p.shape[1]) for p in todo]
        hessians = {}
    linear_curve = _linear_group_curve(stack, base_r, ft_r, plan.linear_params, shared, cfg, hessians)
    if linear_curve is None:
        return proportional
    try:
        curves = [linear_curve] + [_vocab_curve(p, base_r, ft_r, counts, hessians.get("head"), shared, cfg)
                                  for p in todo]
    except (ValueError, RuntimeError):   # non-finite rows or H: compress_vocab_parts reports them in one line
        return proportional
    total = sum(weights)
    if not (math.isfinite(total) and total > 0):   # a model whose logits overflow: no exchange rate to measure
        return proportional
    scaled = [lambda b, f=f, w=w: (w / total) * f(b) for f, w in zip(curves, weights)]
    bits = split_budget(scaled, shared, grid=SPLIT_GRID)
    return BudgetSplit("exchange", compressed, int(bits[0]), 1.0 - bits[0] / compressed, dict(zip(labels, weights)))


def linear_alpha_of(split: BudgetSplit, linear_params: int, alpha: float) -> float:
    """α' of every linear blob: B_lin / 16 n_lin (above α when the vocabulary parts need less than their
    proportional share: the whole delta, not each part, is held to α)."""
    return split.linear_bits / (16 * linear_params) if linear_params else alpha
