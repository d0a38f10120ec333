"""Which fine-tune tensors differ from the base, and the form a tensor kept exactly is stored in.

Linear weights go to the compressor as ΔW; everything else that differs (norms, biases, embedding and
lm_head rows) is stored exactly: whole tensors in `DeltaFile.dense`, vocabulary matrices as the rows
that changed in `DeltaFile.rows`.
"""

from __future__ import annotations

import torch

from ..algorithms.lowrank_svd import FactoredDelta
from ..checkpoint.compatibility import CompatibilityReport
from ..checkpoint.reader import CheckpointReader
from ..format.delta_file import DeltaFile

__all__ = ["add_non_layer_tensors", "changed_exact_tensor", "linear_delta", "stored_form"]


def stored_form(ft_t: torch.Tensor, base_t: torch.Tensor) -> torch.Tensor:
    """A fine-tune tensor kept exactly (norm, bias, embedding rows) as the delta stores it: in its own dtype,
    except that a wider float over a 16-bit base (an fp32 fine-tune of a bf16 model) is stored in the base's
    dtype. merge writes every tensor in the base's dtype (base + ΔŴ for linears, rows into the base), so the
    extra bits would be bytes without effect: SmolLM2's fp32 fine-tune stored 108 MiB of embedding rows."""
    if base_t.dtype in (torch.bfloat16, torch.float16) and ft_t.is_floating_point() \
            and ft_t.element_size() > base_t.element_size():
        return ft_t.to(base_t.dtype)
    return ft_t


def linear_delta(name: str, base_r: CheckpointReader, ft_r) -> torch.Tensor | FactoredDelta | None:
    """ΔW float32 [h_out, h_in] of linear weight `name`, or None when the fine-tune left it unchanged.

    A LoRA fine-tune (models with `lora_factors`) gives FactoredDelta(s·B, A): its SVD comes from the
    factors. Otherwise ΔW = W_ft − W_base, computed without a float32 copy of the base.
    """
    ft_t, base_t = ft_r.get(name, dtype=None), base_r.get(name, dtype=None)
    if torch.equal(base_t, ft_t.to(base_t.dtype)) and base_t.dtype == ft_t.dtype:
        return None
    factors = ft_r.lora_factors(name) if hasattr(ft_r, "lora_factors") else None
    d = FactoredDelta(*factors) if factors else ft_t.to(torch.float32, copy=True).sub_(base_t)
    ft_t = base_t = factors = None  # free before the compressor's own peak
    return d if (d.any() if isinstance(d, FactoredDelta) else torch.any(d)) else None


def changed_exact_tensor(name: str, base_r: CheckpointReader, ft_r) -> torch.Tensor | None:
    """A non-linear tensor of a layer in its stored form when it differs from the base (or is new), else None."""
    ft_t = ft_r.get(name, dtype=None)
    if name not in base_r:
        return ft_t
    base_t = base_r.get(name, dtype=None)
    if torch.equal(base_t, ft_t.to(base_t.dtype)) and base_t.dtype == ft_t.dtype:
        return None
    stored = stored_form(ft_t, base_t)
    return None if stored.dtype == base_t.dtype and torch.equal(stored, base_t) else stored


def add_non_layer_tensors(delta: DeltaFile, names: list[str], base_r: CheckpointReader, ft_r,
                          compat: CompatibilityReport, skip=()) -> None:
    """Embeddings, final norm, lm_head… (but `skip`: the vocabulary matrices a whole-delta run compresses,
    pipeline/whole_budget.py): exact where they differ; vocabulary rows as row deltas."""
    vocab = getattr(ft_r.config.get_text_config(), "vocab_size", None)
    for name in names:
        if name in skip:
            continue
        ft_t = ft_r.get(name, dtype=None)
        if name not in base_r:
            delta.dense[name] = ft_t
            continue
        base_t = base_r.get(name, dtype=None)
        ft_t = stored_form(ft_t, base_t)
        if ft_t.ndim == 2 and (name in compat.resized_vocab or ft_t.shape[0] == vocab):
            n = min(base_t.shape[0], ft_t.shape[0])
            same = (base_t[:n] == ft_t[:n].to(base_t.dtype)).all(dim=1) & (base_t.dtype == ft_t.dtype)
            changed = torch.nonzero(~same).flatten()
            extra = torch.arange(n, ft_t.shape[0])
            idx = torch.cat([changed, extra])
            if idx.numel() or ft_t.shape[0] != base_t.shape[0]:
                delta.rows[name] = (idx, ft_t[idx].contiguous(), list(ft_t.shape))
        elif not (base_t.dtype == ft_t.dtype and torch.equal(base_t, ft_t)):
            delta.dense[name] = ft_t
