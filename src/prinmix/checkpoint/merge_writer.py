"""BASE + DELTA written as a standard Hugging Face checkpoint directory (what `prinmix merge` produces).

Tensors are materialised one at a time (base + ΔŴ for compressed linears, exact tensors and rows
from the delta) and written in safetensors shards of ≤ 2 GiB — one `model.safetensors`, or
`model-0000k.safetensors` with a `model.safetensors.index.json` — beside the fine-tune's config and
tokenizer files. Atomic: built in a temporary sibling directory, then renamed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import DeltaFormatError
from ..format.atomic_dir import atomic_directory
from ..format.delta_file import load_delta
from ..format.output_safety import MERGED_CHECKPOINT, check_output_directory, refuse_input_overlap, write_marker
from .apply_delta import check_base, finetuned_tensor, merged_aux_files, output_tensor_names
from .reader import CheckpointReader

__all__ = ["SHARD_BYTES", "write_merged_checkpoint"]

SHARD_BYTES = 2 * 1024 ** 3


def write_merged_checkpoint(base, delta_path, output, overwrite: bool = False,
                            progress: Callable[[int, int, str], None] | None = None) -> Path:
    """Write base + delta to the directory `output` (refused when non-empty unless `overwrite`).

    progress: None or a callable(done_tensors, total_tensors, tensor name).
    """
    refuse_input_overlap([output], [base, delta_path], "merge")
    base_r = CheckpointReader(base)
    delta = load_delta(delta_path)
    check_base(base_r, delta, delta_path)
    output = Path(output)
    check_output_directory(output, overwrite, MERGED_CHECKPOINT)
    aux_files = merged_aux_files(base_r, delta, delta_path)  # checked before any work
    with atomic_directory(output) as tmp:
        names = output_tensor_names(base_r, delta)
        shard, shard_bytes, shards, index = {}, 0, [], {}

        def flush():
            nonlocal shard, shard_bytes
            if shard:
                fname = f"model-{len(shards) + 1:05d}.safetensors"
                save_file(shard, str(tmp / fname), metadata={"format": "pt"})
                shards.append(fname)
                index.update({n: fname for n in shard})
                shard, shard_bytes = {}, 0

        for j, name in enumerate(names):
            t = finetuned_tensor(name, base_r, delta).contiguous()
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):  # e.g. a delta overflowing fp16
                raise DeltaFormatError(f"{delta_path}: base + delta of {name!r} is not finite in {t.dtype}")
            shard[name] = t
            shard_bytes += t.numel() * t.element_size()
            if shard_bytes >= SHARD_BYTES:
                flush()
            if progress:
                progress(j + 1, len(names), name)
        flush()
        if len(shards) == 1:
            (tmp / shards[0]).rename(tmp / "model.safetensors")
        else:
            total = sum((tmp / s).stat().st_size for s in shards)
            (tmp / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": index}, indent=2))
        for fname, data in aux_files.items():
            (tmp / fname).write_bytes(data)
        write_marker(tmp, MERGED_CHECKPOINT)
    return output
