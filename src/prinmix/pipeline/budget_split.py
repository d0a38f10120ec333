"""How the whole-delta budget is shared between the decoder linears and the vocabulary rows.

The bits left for compressed content, B (the whole budget less exact tensors and header entries), go to
the decoder linears (one ratio α' for all of them, the paper's rule among linears) and to each
compressed vocabulary part (embedding / lm_head changed rows, vocab_delta.py). Two rules:

measured (the default for PrinMix with calibration data; `--split measured`): minimise  Σ_p E_p(B_p)
    subject to Σ_p B_p = B, E_p(B) the KL divergence KL(p_ft ‖ p) in nats per token, on the probe
    (effect_probe.py: EFFECT_SEQUENCES sequences, half calibration windows, half the fine-tune's own
    samples), between the fine-tune and the fine-tune with part p alone compressed by PrinMix at B bits —
    measured, not modelled: each part is really compressed at a few budgets (LINEAR_FACTORS /
    VOCAB_FACTORS × its proportional share, and dropped at 0 bits; one SVD and width simulation per matrix
    for all of them) and the perturbed model really run. The linear group is stood for by the linears of
    SAMPLE_LAYERS layers spread over the depth (their calibrated H from the probe pass, each at
    α' = B_lin / 16·n_lin), their KL scaled by num_layers / SAMPLE_LAYERS; the vocabulary parts are
    compressed in their calibrated objectives (vocab_problem). E_p between measured points is linear in
    log E (errors fall about exponentially in bits); the minimum is taken exactly on a grid
    (vocab_delta.split_budget), the KL being additive over parts since a small logit change's KL is
    quadratic in it and the parts' compression errors are independent.
proportional (`--split proportional`; Delta-CoMe, low-rank and data-free runs always): every compressed
    part gets the same share of its 16-bit size, α' = B / 16·n — the paper's uniform ratio extended from
    the linears to the whole delta.
BitDelta's size is fixed by its format.

Why measured is the default (benchmarks/README.md "Sharing the whole budget"):
- Where the probe is like the text the model is then used on, its optimum is close to the proportional
  share and costs nothing: SmolLM2 pair at whole 1/32, 21.09 % of B to the tied embedding against
  21.05 % proportional; accuracy 0.910 both, logit error 0.0012 vs 0.0019, KL 0.0003 vs 0.0002.
- Where one ratio for every part is not right it finds better: demo pair at whole 1/32, KL on held-out
  task text 0.00036 against proportional's 0.00202 (23.4 % of B to the vocabulary parts vs 31.7 %).
- On calibration text alone it was misled (demo at 1/16: the input embedding left at its floor, KL
  0.00103 against proportional's 0.00001): generic text seldom contains the rows a task fine-tune
  changed. The fine-tune's own samples do (KL 0.00003; effect_probe.py has the table).
- Two modelled rules tried first (one exchange rate between the parts' relative errors of Eq. 8,
  weighted by the logit change of reverting a part or by a sensitivity measured with a spectral-tail
  residual) gave the SmolLM2 embedding 0.8 % and 2.4 % of B at 1/32: KL 0.0025 and 0.0009 against
  proportional's 0.0002 — proxies misjudge the embedding; measuring does not.
Its cost: sampling EFFECT_SEQUENCES/2 windows from the fine-tune, 1 + 4 per part streamed forwards over
EFFECT_SEQUENCES sequences (an untied lm_head's run only the head) and one analysis + 3 budgets of the
sampled linears and of each vocabulary part — SmolLM2 at whole 1/32 on a quiet 2-core machine: compress
241.5 s and 2.90 GiB peak RSS against 162.7 s and 1.80 GiB proportional (benchmarks/README.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..algorithms.budget import budget_bits, prinmix_fixed_overhead_bits
from ..algorithms.compress_matrix import analyse_prinmix, prinmix_at_budget
from ..algorithms.compressed_linear import BLOB_HEADER_BYTES
from ..algorithms.prinmix_config import PrinMixConfig
from ..algorithms.vocab_delta import row_lookup_weights, split_budget
from ..calibration.hessians import capture_hessians
from ..calibration.layer_inputs import run_layer
from ..errors import BudgetError
from .config import SPLIT_RULES
from .effect_probe import EffectProbe
from .tensor_diff import linear_delta

__all__ = ["SAMPLE_LAYERS", "SPLIT_RULES", "BudgetSplit", "EffectProbe", "choose_split", "linear_alpha_of",
           "measures_effects", "sample_layers", "vocab_problem"]

SAMPLE_LAYERS = 4      # layers whose linears stand for the linear group's effect
EFFECT_SEQUENCES = 4   # calibration sequences of the probe (the effects, the sampled layers' and the head's H)
LINEAR_FACTORS = (0.0, 0.5, 1.0)           # linear budgets measured, × their proportional share (+ all of B)
VOCAB_FACTORS = (0.0, 0.5, 1.0, 2.0)   # each vocabulary part's budgets, × its proportional share
SPLIT_GRID = 128       # budget levels of the split (B/128 resolution)
LOGIT_CHUNK_BYTES = 256 * 2 ** 20   # the probe's logits are compared this many bytes at a time


@dataclass
class BudgetSplit:
    """The compressed bits B and the linears' share of them (the vocabulary parts get the rest)."""

    rule: str             # "measured", "proportional" or "fixed share"
    compressed_bits: int  # B
    linear_bits: int      # the linear group's B_lin
    vocab_share: float    # 1 − B_lin / B
    part_bits: dict | None = None    # {vocabulary part name: bits} of the measured rule
    effects: dict | None = None      # {"linears" | part name: [[bits, KL nats/token], …]} it measured


def measures_effects(method: str, rule: str) -> bool:
    """Whether the split is measured (and needs a probe): PrinMix under the measured rule; every other
    method and rule shares proportionally (module docstring)."""
    return method == "prinmix" and rule == "measured"


def sample_layers(n_layers: int, k: int = SAMPLE_LAYERS) -> list[int]:
    """k layer indices spread evenly over [0, n_layers) (first and last included), unique and sorted."""
    if n_layers <= k:
        return list(range(n_layers))
    return sorted({round(j * (n_layers - 1) / (k - 1)) for j in range(k)})


class _PerturbedReader:
    """The fine-tune's reader with offsets added to some tensors: {name: (row ids int64 [n] or None for the
    whole tensor, offset [n, …] or shaped like the tensor)}."""

    def __init__(self, ft_r, offsets: dict) -> None:
        self._ft, self._offsets = ft_r, offsets

    def get(self, name: str, *args, **kwargs) -> torch.Tensor:
        out = self._ft.get(name, *args, **kwargs)
        if name not in self._offsets:
            return out
        rows, offset = self._offsets[name]
        out = out.clone()
        index = slice(None) if rows is None else rows
        out[index] = (out[index].float() + offset.float()).to(out.dtype)   # one rounding to the reader's dtype
        return out

    def __contains__(self, name: str) -> bool:
        return name in self._ft

    def __getattr__(self, attribute: str):
        return getattr(self._ft, attribute)


def vocab_problem(part, base_r, ft_r, counts: torch.Tensor | None, head_H: torch.Tensor | None):
    """(ΔE_R [n, d] float32, H [d, d] or None, row weights [n] or None) of a vocabulary part's objective
    (vocab_delta.py): token-count row weights for the lookup role, head_H for the head role; a lookup-only
    part gets H = 0, a part without calibration neither (Frobenius)."""
    base_t = base_r.get(part.name, dtype=torch.float32)
    ft_t = ft_r.get(part.name, dtype=torch.float32)
    d_rows = ft_t[part.changed] - base_t[part.changed]
    del base_t, ft_t
    weights = H = None
    if counts is not None and "lookup" in part.roles:
        weights = row_lookup_weights(counts, part.shape[0], part.changed).float()
    if head_H is not None and "head" in part.roles:
        H = head_H.float()
    elif weights is not None:
        H = torch.zeros(d_rows.shape[1], d_rows.shape[1])      # lookup only: no head term
    return d_rows, H, weights


@torch.no_grad()
def _final_hidden(stack, reader, ids: torch.Tensor, device, batch_size: int,
                  hessians: dict | None = None) -> torch.Tensor:
    """The last layer's outputs [n, seq, d] of the model `reader` holds, one layer in memory at a time.
    hessians: a dict to fill with {weight name: H = XXᵀ} of the linears of the sample_layers() layers and
    "head" (the final normed states' H)."""
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
    return inputs.hidden


@torch.no_grad()
def _kl_divergence(stack, ids: torch.Tensor, ref, other, device, batch_size: int) -> float:
    """Mean over positions of KL(p_ref ‖ p_other) in nats/token, ref / other = (reader, final hidden
    [n, seq, d]); the logits are made LOGIT_CHUNK_BYTES at a time (a [n, seq, vocab] float32 tensor is GBs at
    large vocabularies)."""
    vocab = int(stack.config.get_text_config().vocab_size or 1)
    step = max(1, LOGIT_CHUNK_BYTES // (4 * ids.shape[1] * vocab))
    total = 0.0
    for j in range(0, ids.shape[0], step):
        log_p = torch.log_softmax(stack.logits(ref[0], ids[j:j + step], ref[1][j:j + step], device, batch_size), -1)
        log_q = torch.log_softmax(stack.logits(other[0], ids[j:j + step], other[1][j:j + step], device,
                                               batch_size), -1)
        total += float((log_p.exp() * (log_p - log_q)).sum())
    return total / (ids.shape[0] * ids.shape[1])


def _residuals(d: torch.Tensor, H: torch.Tensor | None, row_weights: torch.Tensor | None, bits: list[int],
               cfg: PrinMixConfig, device) -> list[torch.Tensor]:
    """ΔŴ − Δ [m, n] float32 of PrinMix on delta d at each of `bits` bits of blob (what the part loses
    there); −Δ (the part dropped) where no blob fits. One SVD and width simulation serve every budget
    (compress_matrix.analyse_prinmix)."""
    m, n = d.shape
    analysis = None
    out = []
    for b in bits:
        blob = budget_bits(max(b - 1, 0) / (16 * m * n), m, n)
        if b <= 0 or blob < 8 * BLOB_HEADER_BYTES:
            out.append(-d.float())
            continue
        try:
            if analysis is None:
                analysis = analyse_prinmix(d.to(device), None if H is None else H.to(device), cfg,
                                           None if row_weights is None else row_weights.to(device))
            c = prinmix_at_budget(analysis, blob)
        except (BudgetError, ValueError):   # a budget below the blob's fixed fields; an entry overflowing float32
            out.append(-d.float())
            continue
        out.append((c.reconstruct() - d.to(device).float()).cpu())
    return out


def _effect_curve(points: list[tuple[int, float]]) -> Callable:
    """E(B) through the measured (bits, KL) points: linear in log E between them (compression errors fall
    about exponentially in bits), flat outside."""
    pts = sorted(points)
    x = np.array([b for b, _ in pts], dtype=np.float64)
    y = np.log(np.array([max(e, 1e-12) for _, e in pts], dtype=np.float64))
    return lambda levels: np.exp(np.interp(np.asarray(levels, dtype=np.float64), x, y))


def _measured_effects(stack, base_r, ft_r, todo, linear_points: list[int], vocab_points: list[list[int]],
                      linear_params: int, cfg: PrinMixConfig, counts, probe: EffectProbe) -> dict:
    """{"linears" | part name: [(bits, KL nats/token)]}: the fine-tune's KL divergence on the probe text from the
    fine-tune with ONE part compressed by PrinMix at each of its budgets (every other part exact).

    Linears: the linears of sample_layers() layers, each at the ratio α' = B_lin / 16·n_lin (their calibrated
    H from the probe pass), the KL scaled by num_layers / len(sampled) — small errors of independent layers
    add (KL is quadratic in a small logit change). Vocabulary parts: their changed rows in their calibrated
    objective (vocab_problem; the head's H from the probe pass)."""
    ids = probe.ids[:EFFECT_SEQUENCES]
    hessians: dict = {}
    h_ft = _final_hidden(stack, ft_r, ids, probe.device, probe.batch_size, hessians)

    def kl(offsets: dict, head_only: bool = False) -> float:
        reader = _PerturbedReader(ft_r, offsets)   # an untied lm_head leaves the final states as they are
        h = h_ft if head_only else _final_hidden(stack, reader, ids, probe.device, probe.batch_size)
        return _kl_divergence(stack, ids, (ft_r, h_ft), (reader, h), probe.device, probe.batch_size)

    sampled = sample_layers(stack.num_layers)
    linears = []
    for i in sampled:
        for short in stack.linear_names(i):
            name = stack.layer_prefix(i) + short + ".weight"
            d = linear_delta(name, base_r, ft_r) if name in base_r else None
            if isinstance(d, torch.Tensor):
                linears.append((name, d))
    effects: dict = {"linears": []}
    scale = stack.num_layers / len(sampled)
    per_matrix = {name: _residuals(d, hessians.get(name), None,
                                   [budget_bits(bits / (16 * linear_params), *d.shape) for bits in linear_points],
                                   cfg, probe.device) for name, d in linears}
    for j, bits in enumerate(linear_points):
        effects["linears"].append((bits, scale * kl({name: (None, r[j]) for name, r in per_matrix.items()})))
    del per_matrix
    for part, points in zip(todo, vocab_points):
        d_rows, H, weights = vocab_problem(part, base_r, ft_r, counts, hessians.get("head"))
        effects[part.name] = [(bits, kl({part.name: (part.changed, r)}, head_only=part.roles == ("head",)))
                              for bits, r in zip(points, _residuals(d_rows, H, weights, points, cfg, probe.device))]
    return effects


def choose_split(plan, stack, base_r, ft_r, method: str, cfg: PrinMixConfig, counts: torch.Tensor | None,
                 vocab_share: float | None = None, probe: EffectProbe | None = None,
                 rule: str = "proportional") -> BudgetSplit:
    """Share plan's compressed bits between the linear group and the vocabulary parts (module docstring).

    plan: a whole_budget.WholeBudget; counts: int64 [vocab] calibration token counts (None: uncalibrated);
    vocab_share: force the vocabulary parts' share of B (benchmarks), None: by `rule` — "proportional" or
    "measured" (needs `probe`, the calibration text the effects are measured on; without one, or for a
    method other than PrinMix, proportional)."""
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
    if not measures_effects(method, rule) or probe is None:
        return proportional
    # every vocabulary part keeps at least its blob's fixed fields (a blob of no ranks), outside the split
    floor = prinmix_fixed_overhead_bits(cfg.fmax)
    shared = compressed - len(todo) * floor
    if shared <= 0:
        return proportional
    lin_prop = shared * plan.linear_params // entries
    linear_points = sorted({min(int(f * lin_prop), shared) for f in LINEAR_FACTORS} | {shared})
    vocab_points = [sorted({min(int(f * shared * p.changed.numel() * p.shape[1] // entries), shared)
                            for f in VOCAB_FACTORS}) for p in todo]
    if counts is not None:   # lookup weights count the probe's positions, as the head's H does
        counts = counts * (probe.ids[:EFFECT_SEQUENCES].numel() / max(float(counts.sum()), 1.0))
    effects = _measured_effects(stack, base_r, ft_r, todo, linear_points, vocab_points, plan.linear_params, cfg,
                                counts, probe)
    if not all(math.isfinite(e) for points in effects.values() for _, e in points):
        return proportional   # a model whose logits overflow: no effect to compare
    names = ["linears"] + [p.name for p in todo]
    bits = split_budget([_effect_curve(effects[n]) for n in names], shared, grid=SPLIT_GRID)
    parts = {p.name: int(b) + floor for p, b in zip(todo, bits[1:])}
    return BudgetSplit("measured", compressed, int(bits[0]), 1.0 - bits[0] / compressed, parts,
                       {n: [[int(b), float(e)] for b, e in effects[n]] for n in names})


def linear_alpha_of(split: BudgetSplit, linear_params: int, alpha: float) -> float:
    """α' of every linear blob: B_lin / 16 n_lin (above α when the vocabulary parts need less than their
    proportional share: the whole delta, not each part, is held to α)."""
    return split.linear_bits / (16 * linear_params) if linear_params else alpha
