"""BASE + DELTA written as a standard Hugging Face checkpoint directory (what `prinmix merge` produces).

Tensors are materialised shard by shard (base + ΔŴ for compressed linears, exact tensors and rows from
the delta) into safetensors shards planned as huggingface_hub plans them (format/hf_checkpoint.py:
`model.safetensors`, or `model-0000k-of-0000n.safetensors` with a `model.safetensors.index.json`),
beside the fine-tune's config and tokenizer files. Atomic: built in a temporary sibling directory,
then renamed. Optionally every floating-point tensor is cast to one dtype (config.json says so).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from ..errors import DeltaFormatError, PrinmixError
from ..format.atomic_dir import atomic_directory
from ..format.delta_file import DeltaFile, load_delta
from ..format.hf_checkpoint import DEFAULT_MAX_SHARD_SIZE, write_safetensors_shards
from ..format.output_safety import MERGED_CHECKPOINT, check_output_directory, refuse_input_overlap, write_marker
from .apply_delta import check_base, finetuned_tensor, merged_aux_files, output_tensor_names
from .reader import CheckpointReader

__all__ = ["MERGE_DTYPES", "write_merged_checkpoint"]

MERGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _merged_layout(name: str, base_r: CheckpointReader, delta: DeltaFile) -> tuple[tuple[int, ...], torch.dtype]:
    """(shape, dtype) of the merged tensor `name` as finetuned_tensor makes it, without computing it."""
    if name in delta.dense:
        return tuple(delta.dense[name].shape), delta.dense[name].dtype
    if name in delta.rows:
        return tuple(delta.rows[name][2]), base_r.dtype(name)
    return tuple(base_r.shape(name)), base_r.dtype(name)


def _with_dtype(config_json: bytes, dtype_name: str) -> bytes:
    """config.json with its dtype field(s) set ("dtype" in transformers ≥ 5, "torch_dtype" before)."""
    cfg = json.loads(config_json)
    cfg["dtype"] = dtype_name
    if "torch_dtype" in cfg:
        cfg["torch_dtype"] = dtype_name
    return (json.dumps(cfg, indent=2, sort_keys=True) + "\n").encode()


def write_merged_checkpoint(base, delta_path, output, overwrite: bool = False,
                            progress: Callable[[int, int, str], None] | None = None, revision: str | None = None,
                            max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, dtype: str | None = None) -> Path:
    """Write base + delta to the directory `output` (refused when non-empty unless `overwrite`).

    base: a directory or Hub id (revision: of the Hub id). progress: None or a callable(done_tensors,
    total_tensors, tensor name). dtype: None keeps each tensor's dtype, else a key of MERGE_DTYPES.
    """
    if dtype is not None and dtype not in MERGE_DTYPES:
        raise PrinmixError(f"--dtype {dtype!r}: choose one of {', '.join(MERGE_DTYPES)}")
    refuse_input_overlap([output], [base, delta_path], "merge")
    base_r = CheckpointReader(base, revision)
    delta = load_delta(delta_path)
    check_base(base_r, delta, delta_path)
    output = Path(output)
    check_output_directory(output, overwrite, MERGED_CHECKPOINT)
    aux_files = merged_aux_files(base_r, delta, delta_path)  # checked before any work
    layout = {n: _merged_layout(n, base_r, delta) for n in output_tensor_names(base_r, delta)}
    cast = MERGE_DTYPES.get(dtype)
    if cast is not None:
        layout = {n: (shape, cast if t.is_floating_point else t) for n, (shape, t) in layout.items()}
        if "config.json" in aux_files:
            aux_files["config.json"] = _with_dtype(aux_files["config.json"], dtype)

    def make(name: str) -> torch.Tensor:
        # base + ΔŴ computed in float32 and rounded once to the output dtype: with dtype float32 a bfloat16
        # base's merge is base + ΔŴ exactly (not rounded to bfloat16 first, then widened)
        t = finetuned_tensor(name, base_r, delta, layout[name][1] if cast is not None else None)
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):  # e.g. a delta overflowing fp16
            raise DeltaFormatError(f"{delta_path}: base + delta of {name!r} is not finite in {t.dtype}")
        return t

    with atomic_directory(output) as tmp:
        write_safetensors_shards(tmp, layout, make, max_shard_size, progress)
        for fname, data in aux_files.items():
            (tmp / fname).write_bytes(data)
        write_marker(tmp, MERGED_CHECKPOINT)
    return output
