"""Apply a DeltaFile to base tensors, one tensor at a time (used by merge, eval and the runtime)."""

from __future__ import annotations

import torch

from ..errors import BaseMismatchError
from ..format.delta_file import DeltaFile
from .checkpoint import CheckpointReader


def base_fingerprint(base: CheckpointReader) -> dict:
    """What a delta records of its base: model type, tensor count and a content hash (names,
    shapes, dtypes and sampled bytes of every tensor; see CheckpointReader.content_hash)."""
    return {"model_type": base.model_type, "n_tensors": len(base.tensor_names),
            "content_hash": base.content_hash()}


def check_base(base: CheckpointReader, delta: DeltaFile, delta_path) -> None:
    """Raise BaseMismatchError when `delta` was made for another base than `base`."""
    want = delta.base_fingerprint
    if want.get("model_type") != base.model_type:
        raise BaseMismatchError(f"{delta_path}: made for a {want.get('model_type')!r} base, "
                                f"but {base.path} is {base.model_type!r}")
    if want.get("content_hash") != base.content_hash():
        raise BaseMismatchError(f"{delta_path}: made for another base model than {base.path} "
                                f"(weights fingerprint differs)")


def output_tensor_names(base: CheckpointReader, delta: DeltaFile) -> list[str]:
    """Names of the fine-tune's tensors: the base's, minus those removed, plus those only in the fine-tune."""
    removed = set(delta.params.get("removed_tensors", []))
    names = [n for n in base.tensor_names if n not in removed]
    names += [n for n in delta.dense if n not in set(base.tensor_names)]
    return sorted(names)


def finetuned_tensor(name: str, base: CheckpointReader | None, delta: DeltaFile,
                     dtype: torch.dtype | None = None, base_tensor: torch.Tensor | None = None) -> torch.Tensor:
    """The reconstructed fine-tune tensor `name`: base + ΔŴ, a stored exact replacement, or the base.

    dtype None keeps the stored dtype (base dtype for linears and unchanged tensors).
    """
    if name in delta.dense:
        t = delta.dense[name]
        return t if dtype is None else t.to(dtype)
    w = base_tensor if base_tensor is not None else base.get(name, dtype=None)
    out_dtype = dtype or w.dtype
    if name in delta.matrices:
        m = delta.matrices[name]
        if tuple(w.shape) != m.shape:
            raise BaseMismatchError(f"delta matrix {name!r} is {list(m.shape)}, base tensor is {list(w.shape)}")
        return (w.to(torch.float32) + m.reconstruct(torch.float32)).to(out_dtype)
    if name in delta.rows:
        idx, values, shape = delta.rows[name]
        if w.ndim != 2 or w.shape[1] != shape[1]:
            raise BaseMismatchError(f"delta rows of {name!r} have width {shape[1]}, base tensor is {list(w.shape)}")
        out = torch.zeros(shape, dtype=values.dtype)
        n = min(shape[0], w.shape[0])
        out[:n] = w[:n].to(values.dtype)
        out[idx] = values
        return out.to(out_dtype)
    return w.to(out_dtype)
