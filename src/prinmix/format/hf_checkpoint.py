"""Write a model's tensors as Hugging Face safetensors shards, one shard in memory at a time.

The shard plan (which tensor goes to which file, file names `model-00001-of-0000N.safetensors`, the
index's `metadata.total_size`) is huggingface_hub's own `split_torch_state_dict_into_shards`, run on
meta tensors (shape and dtype only), so the layout and `model.safetensors.index.json` are exactly what
`save_torch_state_dict` / transformers' `save_pretrained` write. The tensors themselves are produced
shard by shard by a callback: `save_torch_state_dict` would need the whole state dict in memory (a
merged 70B model is 140 GB), which is why the writing loop is ours and only the loop.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import save_file

__all__ = ["write_safetensors_shards", "DEFAULT_MAX_SHARD_SIZE"]

DEFAULT_MAX_SHARD_SIZE = "5GB"  # huggingface_hub's default for save_torch_state_dict


def write_safetensors_shards(directory: Path, layout: dict[str, tuple[tuple[int, ...], torch.dtype]],
                             make_tensor: Callable[[str], torch.Tensor], max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
                             progress: Callable[[int, int, str], None] | None = None) -> list[Path]:
    """Write `model.safetensors`, or shards plus `model.safetensors.index.json`, into `directory`.

    Args:
        directory: an existing (empty) directory.
        layout: {tensor name: (shape, dtype)} of every tensor to write.
        make_tensor: name -> the tensor (called once per name, shard by shard; must match the layout).
        max_shard_size: bytes per shard, an int or "5GB"/"2GiB" as huggingface_hub parses it.
        progress: None or a callable(done_tensors, total_tensors, name).

    Returns:
        The files written (shards, then the index when sharded).
    """
    meta = {n: torch.empty(shape, dtype=dtype, device="meta") for n, (shape, dtype) in layout.items()}
    plan = split_torch_state_dict_into_shards(meta, max_shard_size=max_shard_size)
    written, done, total = [], 0, len(layout)
    for filename, names in plan.filename_to_tensors.items():
        shard = {}
        for name in names:
            t = make_tensor(name).contiguous()
            if tuple(t.shape) != tuple(layout[name][0]) or t.dtype != layout[name][1]:
                raise ValueError(f"{name}: made {t.dtype} {list(t.shape)}, planned {layout[name][1]} "
                                 f"{list(layout[name][0])}")
            shard[name] = t
            done += 1
            if progress:
                progress(done, total, name)
        save_file(shard, str(directory / filename), metadata={"format": "pt"})
        written.append(directory / filename)
        del shard
    if plan.is_sharded:
        index = directory / "model.safetensors.index.json"
        index.write_text(json.dumps({"metadata": plan.metadata, "weight_map": plan.tensor_to_filename}, indent=2))
        written.append(index)
    return written
