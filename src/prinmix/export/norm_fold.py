"""Which changed norm weights a LoRA adapter can carry, by folding them into the linears reading them.

An RMSNorm / LayerNorm weight γ scales the normalised activation n(x) per input feature, and a linear
W reading it computes W·diag(g)·n(x), g = γ (Gemma: g = 1 + γ). A fine-tune with (W_ft, g_ft) thus
equals a model keeping the base's norm (g_base) whose linear is W_eff = W_ft·diag(ρ), ρ = g_ft / g_base:
W_eff·diag(g_base) = W_ft·diag(g_ft). The adapter's delta for that linear becomes
    ΔW_eff = W_eff − W_base = ΔŴ·diag(ρ) + W_base·diag(ρ − 1),
exact, but of rank up to rank(ΔŴ) + #{j: ρ_j ≠ 1} (see export_lora for the rank limit).

Not foldable, hence refused (NormFoldError names the tensor):
- g_base_j = 0 where g_ft_j ≠ 0: no W_eff reaches that feature;
- a norm whose output feeds the residual stream directly (Gemma-2/3 post-attention and
  post-feed-forward norms: h + g ⊙ n(o_proj(·)); the normalisation after the linear divides out any
  rescaling of its rows) or that normalises a projection's output (Gemma-3 / Qwen3 q_norm, k_norm);
- a norm of an architecture this table does not describe.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..errors import PrinmixError

__all__ = ["NORM_LAYOUTS", "NormFoldError", "NormLayout", "fold_targets", "norm_ratio"]


class NormFoldError(PrinmixError):
    """A changed norm weight that no LoRA adapter can carry."""


@dataclass(frozen=True)
class NormLayout:
    """Per decoder layer: norm name → the linears (module suffixes) reading its output; the final norm
    reads into lm_head. offset: the norm multiplies by (offset + γ) (Gemma: 1). residual: norms a
    LoRA adapter cannot carry, with the reason."""

    consumers: dict[str, tuple[str, ...]]
    offset: float = 0.0
    residual: dict[str, str] | None = None


_LLAMA = NormLayout({"input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                     "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj")})
_GEMMA_RESIDUAL = {
    "post_attention_layernorm": "normalises the attention output before the residual add",
    "post_feedforward_layernorm": "normalises the MLP output before the residual add",
    "self_attn.q_norm": "normalises q_proj's output per head",
    "self_attn.k_norm": "normalises k_proj's output per head",
}
_GEMMA = NormLayout({"input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                     "pre_feedforward_layernorm": ("mlp.gate_proj", "mlp.up_proj")},
                    offset=1.0, residual=_GEMMA_RESIDUAL)

NORM_LAYOUTS: dict[str, NormLayout] = {"llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA,
                                       "gemma2": _GEMMA, "gemma3_text": _GEMMA}
FINAL_NORM = "model.norm.weight"
_LAYER_NORM = re.compile(r"^(?P<layer>model\.layers\.\d+\.)(?P<norm>.+)\.weight$")


def fold_targets(model_type: str, norm_name: str) -> list[str]:
    """Weight names of the linears that absorb the change of norm weight `norm_name`.

    model.layers.<i>.<norm>.weight → that layer's consumer linears; model.norm.weight → lm_head.weight.
    NormFoldError (naming the tensor and why) for a norm that cannot be folded.
    """
    layout = NORM_LAYOUTS.get(model_type)
    if layout is None:
        raise NormFoldError(f"{norm_name}: changed, and export-lora does not know which linears read the norms "
                            f"of model_type {model_type!r} (known: {', '.join(sorted(NORM_LAYOUTS))})")
    if norm_name == FINAL_NORM:
        return ["lm_head.weight"]
    match = _LAYER_NORM.match(norm_name)
    if match is not None:
        norm = match["norm"]
        if layout.residual and norm in layout.residual:
            raise NormFoldError(f"{norm_name}: changed, and this norm {layout.residual[norm]}; no linear of a "
                                f"LoRA adapter can carry its change")
        if norm in layout.consumers:
            return [f"{match['layer']}{c}.weight" for c in layout.consumers[norm]]
    raise NormFoldError(f"{norm_name}: changed, and it is not a norm export-lora can fold for {model_type!r}")


def norm_ratio(model_type: str, norm_name: str, g_base: torch.Tensor, g_ft: torch.Tensor) -> torch.Tensor:
    """ρ = (offset + γ_ft) / (offset + γ_base) per feature, float64 [h]; 1 where both are 0.

    NormFoldError where offset + γ_base = 0 but offset + γ_ft ≠ 0 (no rescaling of a linear can revive
    a feature the base's norm zeroes).
    """
    offset = NORM_LAYOUTS[model_type].offset
    base, ft = g_base.double() + offset, g_ft.double() + offset
    dead = (base == 0) & (ft != 0)
    if dead.any():
        raise NormFoldError(f"{norm_name}: the base's norm weight is 0 at {int(dead.sum())} features the "
                            f"fine-tune uses (e.g. feature {int(dead.nonzero()[0])}); folding it is impossible")
    return torch.where(base == 0, torch.ones_like(base), ft / torch.where(base == 0, torch.ones_like(base), base))
