"""The Python API: compress, merge, load_delta, info. The CLI is a thin shell over these.

Each function validates its arguments and hands off to the module that does the work:
compress → pipeline/compress.py, merge → checkpoint/merge_writer.py, load_delta → format/delta_file.py,
info → format/delta_info.py (docs/architecture.md has the map).
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
from .pipeline.compress import CompressSummary, run_compress
from .pipeline.config import CalibrationConfig, CompressJob
from .pipeline.events import Listener

__all__ = ["CalibrationConfig", "CompressSummary", "DeltaInfo", "PrinMixConfig", "compress", "info", "load_delta",
           "merge"]

PathLike = str | os.PathLike


def compress(base: PathLike, finetuned: PathLike, output: PathLike, ratio: str | float = "1/16",
             method: str = "prinmix", *, config: PrinMixConfig | None = None,
             calibration: CalibrationConfig | None = None, device: str = "auto", resume: bool = True,
             distill_steps: int = 0, listeners: Sequence[Listener] = ()) -> CompressSummary:
    """Compress FINETUNED against BASE into a delta file at OUTPUT (atomic; resumable).

    Args:
        base: the base model's Hugging Face checkpoint directory.
        finetuned: the fine-tune's checkpoint directory, or a PEFT LoRA adapter directory over BASE.
        output: the delta file to write.
        ratio: of the 16-bit delta, e.g. "1/16", 0.0625 or "16x"; every stored byte counts against it.
        method: a name of `prinmix.algorithms.methods.METHODS` (prinmix, deltacome, lowrank, bitdelta).
        config: PrinMix's knobs (candidate widths, f_max, …; PrinMixConfig's defaults when None).
        calibration: the calibration pass (text, nsamples × seqlen, seed, batch size, offload directory).
        device: "auto", "cpu", "cuda" or "cuda:N".
        resume: reuse the finished layers of an interrupted run with the same settings.
        distill_steps: BitDelta only — Adam steps of scale distillation against the fine-tune's logits.
        listeners: callables receiving the run's events (prinmix.pipeline.events: layer done, Hessians, …).

    Returns:
        CompressSummary: the file's path, its byte counts and the achieved ratio.

    Example:
        >>> prinmix.compress("base/", "ft/", "ft.delta", "1/16",
        ...                  calibration=CalibrationConfig(nsamples=64, seqlen=1024))
    """
    job = CompressJob.create(base, finetuned, output, ratio, method, config, calibration, distill_steps)
    return run_compress(job, resolve_device(device), resume, listeners)


def merge(base: PathLike, delta_path: PathLike, output: PathLike, overwrite: bool = False,
          progress: Callable[[int, int, str], None] | None = None) -> Path:
    """Write BASE + DELTA as a standard Hugging Face checkpoint directory.

    Args:
        base: the base checkpoint the delta was made for (checked by its content fingerprint).
        delta_path: the delta file.
        output: the directory to create (safetensors shards + the fine-tune's config/tokenizer files).
        overwrite: replace a non-empty `output`.
        progress: None or a callable(done_tensors, total_tensors, tensor name).

    Returns:
        Path: `output`.

    Example:
        >>> prinmix.merge("base/", "ft.delta", "merged/")
    """
    return write_merged_checkpoint(base, delta_path, output, overwrite, progress)


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
