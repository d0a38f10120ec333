"""The PEFT-style in-memory path: deltas on a model already loaded, no merged checkpoint written.

    model = AutoModelForCausalLM.from_pretrained("HuggingFaceTB/SmolLM2-135M")
    prinmix.apply_delta(model, "math.delta")          # merged weights, in place (as peft's merge_and_unload)

    mt = prinmix.load_with_deltas("HuggingFaceTB/SmolLM2-135M", {"math": "math.delta", "code": "code.delta"})
    mt.generate(prompts_ids, tenants=["math", "code"], max_new_tokens=32)   # one batch, several fine-tunes

apply_delta writes exactly what `prinmix.merge` writes for each tensor (base + ΔŴ computed in float32,
cast to the parameter's dtype, compressed embedding / lm_head rows likewise; exact replacements and rows copied), so a model
loaded in the checkpoint's dtype ends bit-identical to the merged checkpoint loaded back.

What needs a checkpoint rather than a live model is refused with a pointer to `prinmix merge`: a
delta that resizes the vocabulary, adds or removes tensors. The fine-tune's config/tokenizer files
are not applied (the model object keeps its config).

load_with_deltas is a thin shell over runtime.MultiTenantModel's public API (constructor, add_tenant):
the deltas stay compressed and are applied per request inside the batched forward.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from .checkpoint.apply_delta import check_base, finetuned_tensor
from .checkpoint.hub import resolve_model_dir
from .checkpoint.reader import CheckpointReader
from .errors import BaseMismatchError, PrinmixError
from .format.delta_file import DeltaFile, load_delta
from .runtime.multi_tenant import MultiTenantModel

__all__ = ["apply_delta", "load_with_deltas"]


def _delta_and_label(delta) -> tuple[DeltaFile, str]:
    if isinstance(delta, DeltaFile):
        return delta, "the delta"
    if isinstance(delta, (str, os.PathLike)):
        return load_delta(delta), str(delta)
    raise PrinmixError(f"apply_delta: expected a delta file path or a DeltaFile, got {type(delta).__name__}")


def apply_delta(model: torch.nn.Module, delta, verify_base: bool = True) -> torch.nn.Module:
    """Add a delta to an in-memory transformers model, in place (its merged weights, as `merge` writes them).

    Args:
        model: a transformers PreTrainedModel holding the base's weights (any dtype, any device).
        delta: a delta file path, or a DeltaFile from `prinmix.load_delta`.
        verify_base: check the delta's base fingerprint against the checkpoint the model was loaded from
            (`model.name_or_path`, a directory or a Hub id in the local cache). A model built in memory has
            none: pass False to skip the check (shapes and the model type are still checked).

    Returns:
        The same model object, its parameters updated in place.

    Raises:
        BaseMismatchError: the delta was made for another base (type, fingerprint or shapes differ).
        PrinmixError: not a model, or the delta needs a checkpoint (vocabulary resize, added or removed tensors).
    """
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise PrinmixError(f"apply_delta: expected a transformers PreTrainedModel, got {type(model).__name__}")
    d, label = _delta_and_label(delta)
    want = d.base_fingerprint.get("model_type")
    if want and want != getattr(model.config, "model_type", None):
        raise BaseMismatchError(f"{label}: made for a {want!r} base, but the model is "
                                f"{getattr(model.config, 'model_type', None)!r}")
    if verify_base:
        source = getattr(model, "name_or_path", "") or ""
        if not source:
            raise PrinmixError(f"{label}: the model has no name_or_path to verify the base against; load it with "
                               "from_pretrained, or pass verify_base=False")
        check_base(CheckpointReader(source), d, label)
    state = model.state_dict(keep_vars=True)  # tied weights appear under both names, one tensor
    names = sorted(set(d.matrices) | set(d.dense) | set(d.rows) | set(d.vocab))  # vocab: compressed rows
    missing = [n for n in names if n not in state]
    if missing or d.params.get("removed_tensors"):
        what = f"adds tensor {missing[0]!r}" if missing else f"removes {d.params['removed_tensors'][0]!r}"
        raise PrinmixError(f"{label}: {what}, which a loaded model cannot take; write a checkpoint with "
                           "`prinmix merge` instead")
    for name in names:
        p = state[name]
        rows_shape = (d.rows.get(name) or d.vocab.get(name) or (None, None, list(p.shape)))[2]
        if list(rows_shape) != list(p.shape):
            raise PrinmixError(f"{label}: resizes {name} from {list(p.shape)} to {rows_shape}; write a "
                               "checkpoint with `prinmix merge` instead")
        new = finetuned_tensor(name, None, d, dtype=p.dtype, base_tensor=p.detach().cpu())
        if tuple(new.shape) != tuple(p.shape):
            raise BaseMismatchError(f"{label}: {name} is {list(new.shape)} in the delta, {list(p.shape)} in the model")
        with torch.no_grad():
            p.copy_(new.to(p.device))
    return model


def load_with_deltas(base, deltas: Mapping[str, str | os.PathLike] | Sequence[str | os.PathLike],
                     device: str = "cpu", dtype: torch.dtype | None = None, revision: str | None = None):
    """Load BASE once with several deltas as tenants, for generation without merged checkpoints.

    Args:
        base: the base model: a directory or a Hugging Face Hub id.
        deltas: {tenant name: delta path}, or a list of paths (tenant name = the file's stem).
        device: where the base and the compressed deltas live ("cpu", "cuda", …).
        dtype: the base's dtype (None: the checkpoint's).
        revision: of a Hub id.

    Returns:
        runtime.MultiTenantModel; `generate(prompt_ids, tenants=[name or None, …], max_new_tokens)` runs
        each sequence with its tenant's delta (None: the base) in one batch.
    """
    if not isinstance(deltas, Mapping):
        paths = [Path(p) for p in deltas]
        named = {p.stem: p for p in paths}
        if len(named) != len(paths):
            raise PrinmixError("two deltas share a file name; pass {tenant name: path} instead")
        deltas = named
    model = MultiTenantModel(resolve_model_dir(base, revision).path, device=device, dtype=dtype)
    for name, path in deltas.items():
        model.add_tenant(name, path)
    return model
