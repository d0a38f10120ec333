"""The Python API: compress, merge, load_delta, info. The CLI is a thin shell over these.

Each function validates its arguments and hands off to the module that does the work:
compress → pipeline/compress.py, merge → checkpoint/merge_writer.py, load_delta → format/delta_file.py,
info → format/delta_info.py, apply_delta / load_with_deltas → in_memory.py (docs/architecture.md has the map).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

from .algorithms.compress_matrix import PrinMixConfig
from .checkpoint.merge_writer import write_merged_checkpoint
from .device import resolve_device
from .format.delta_file import DeltaFile
from .format.delta_file import load_delta as _load_delta
from .format.delta_info import DeltaInfo, describe_delta
from .format.hf_checkpoint import DEFAULT_MAX_SHARD_SIZE
from .in_memory import apply_delta, load_with_deltas
from .pipeline.compress import CompressSummary, run_compress
from .pipeline.config import CalibrationConfig, CompressJob
from .pipeline.events import Listener

__all__ = ["CalibrationConfig", "CompressSummary", "DeltaInfo", "PrinMixConfig", "apply_delta", "compress", "info",
           "load_delta", "load_with_deltas", "merge"]

PathLike = str | os.PathLike


def compress(base: PathLike, finetuned: PathLike, output: PathLike, ratio: str | float = "1/16",
             method: str = "prinmix", *, config: PrinMixConfig | None = None,
             calibration: CalibrationConfig | None = None, device: str = "auto", resume: bool = True,
             distill_steps: int = 0, listeners: Sequence[Listener] = (), base_revision: str | None = None,
             finetuned_revision: str | None = None) -> CompressSummary:
    """Compress FINETUNED against BASE into a delta file at OUTPUT (atomic; resumable).

    Args:
        base: the base model: a Hugging Face checkpoint directory or a Hub id (e.g. "HuggingFaceTB/SmolLM2-135M",
            fetched into / found in the Hub cache; HF_HUB_OFFLINE=1 uses the cache only).
        finetuned: the fine-tune's checkpoint directory or Hub id, or a PEFT LoRA adapter over BASE.
        output: the delta file to write.
        ratio: of the 16-bit delta, e.g. "1/16", 0.0625 or "16x"; every stored byte counts against it.
        method: a name of `prinmix.algorithms.methods.METHODS` (prinmix, deltacome, lowrank, bitdelta).
        config: PrinMix's knobs (candidate widths, f_max, …; PrinMixConfig's defaults when None).
        calibration: the calibration pass (text, nsamples × seqlen, seed, batch size, offload directory).
        device: "auto", "cpu", "cuda" or "cuda:N".
        resume: reuse the finished layers of an interrupted run with the same settings.
        distill_steps: BitDelta only — Adam steps of scale distillation against the fine-tune's logits.
        listeners: callables receiving the run's events (prinmix.pipeline.events: layer done, Hessians, …).
        base_revision, finetuned_revision: a Hub branch, tag or commit (None: the default branch).

    Returns:
        CompressSummary: the file's path, its byte counts and the achieved ratio.

    Example:
        >>> prinmix.compress("base/", "ft/", "ft.delta", "1/16",
        ...                  calibration=CalibrationConfig(nsamples=64, seqlen=1024))
    """
    job = CompressJob.create(base, finetuned, output, ratio, method, config, calibration, distill_steps,
                             base_revision, finetuned_revision)
    return run_compress(job, resolve_device(device), resume, listeners)


def merge(base: PathLike, delta_path: PathLike, output: PathLike, overwrite: bool = False,
          progress: Callable[[int, int, str], None] | None = None, *, revision: str | None = None,
          max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, dtype: str | None = None) -> Path:
    """Write BASE + DELTA as a standard Hugging Face checkpoint directory.

    Args:
        base: the base the delta was made for, a directory or a Hub id (checked by its content fingerprint).
        delta_path: the delta file.
        output: the directory to create (safetensors shards + the fine-tune's config/tokenizer files).
        overwrite: replace a non-empty `output`.
        progress: None or a callable(done_tensors, total_tensors, tensor name).
        revision: of a Hub id BASE.
        max_shard_size: per safetensors shard (huggingface_hub's shard layout and index).
        dtype: None keeps each tensor's dtype (the base's); "float32", "bfloat16" or "float16" casts every
            floating-point tensor and sets config.json's dtype.

    Returns:
        Path: `output`.

    Example:
        >>> prinmix.merge("base/", "ft.delta", "merged/")
    """
    return write_merged_checkpoint(base, delta_path, output, overwrite, progress, revision, max_shard_size, dtype)


def load_delta(path: PathLike) -> DeltaFile:
    """Read and validate a delta file (every header field and checksum; see docs/format.md).

    Example:
        >>> delta = prinmix.load_delta("ft.delta"); delta.method
        'prinmix'
    """
    return _load_delta(path)


def info(delta_path: PathLike) -> DeltaInfo:
    """Method, ratios, true bytes, base fingerprint and per-matrix bit allocation of a delta file.

    Returns:
        DeltaInfo (`.to_dict()` is `prinmix info --json`).

    Example:
        >>> prinmix.info("ft.delta").ratio_achieved
        0.0624...
    """
    return describe_delta(delta_path)
