"""The Python API: compress, merge, load_delta, info. The CLI is a thin shell over these.

Each function validates its arguments and hands off to the module that does the work (a loaded model where
a checkpoint is expected is refused with what to do instead: prinmix streams checkpoints tensor by tensor):
compress → pipeline/compress.py, merge → checkpoint/merge_writer.py, load_delta → format/delta_file.py,
info → format/delta_info.py, apply_delta / load_with_deltas → in_memory.py, evaluate_deltas → evaluate/run.py,
report → evaluate/report/, export_lora → export/lora.py (docs/architecture.md has the map).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .algorithms.compress_matrix import PrinMixConfig
from .checkpoint.merge_writer import write_merged_checkpoint
from .device import resolve_device
from .errors import PrinmixError
from .evaluate.report import ReportOptions, build_report
from .evaluate.run import EvalConfig, run_eval
from .export.lora import export_lora as _export_lora
from .format.delta_file import DeltaFile
from .format.delta_file import load_delta as _load_delta
from .format.delta_info import DeltaInfo, describe_delta
from .format.hf_checkpoint import DEFAULT_MAX_SHARD_SIZE
from .in_memory import apply_delta, load_with_deltas
from .pipeline.compress import CompressSummary, run_compress
from .pipeline.config import CalibrationConfig, CompressJob
from .pipeline.events import Listener

__all__ = ["CalibrationConfig", "CompressSummary", "DeltaInfo", "EvalConfig", "PrinMixConfig", "ReportOptions",
           "apply_delta", "compress", "evaluate_deltas", "export_lora", "info", "load_delta", "load_with_deltas", "merge",
           "report"]

PathLike = str | os.PathLike


def _model_location(value, what: str):
    """A directory or Hub id, as given; a loaded model is refused with what to do instead (one line)."""
    if isinstance(value, torch.nn.Module):
        raise PrinmixError(f"{what}: got a loaded {type(value).__name__}; prinmix streams checkpoints tensor by tensor, "
                           "so give its directory or Hub id (model.save_pretrained(dir) first), or use "
                           "prinmix.apply_delta(model, delta) to add a delta to a loaded model")
    if not isinstance(value, (str, os.PathLike)):
        raise PrinmixError(f"{what}: expected a checkpoint directory or a Hugging Face Hub id, got {type(value).__name__}")
    return value


def compress(base: PathLike, finetuned: PathLike, output: PathLike, ratio: str | float = "1/16",
             method: str = "prinmix", *, config: PrinMixConfig | None = None,
             calibration: CalibrationConfig | None = None, device: str = "auto", resume: bool = True,
             distill_steps: int = 0, listeners: Sequence[Listener] = (), base_revision: str | None = None,
             finetuned_revision: str | None = None, exact_embeddings: bool = False,
             vocab_share: float | None = None, split: str = "measured") -> CompressSummary:
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
        exact_embeddings: α holds for the decoder linears only and every other tensor that differs is stored
            exactly (the earlier behaviour, for comparison); default: α holds for the whole delta
            (pipeline/whole_budget.py). Becomes CompressJob.exact_embeddings.
        vocab_share: whole-delta mode: force the embedding / lm_head rows' share of the compressed bits
            (to compare splits); None (default): shared by `split`.
        split: whole-delta mode: "measured" (default; PrinMix with calibration: the bits that minimise the
            KL divergence each part's compression is measured to cause on calibration text and the
            fine-tune's own samples; other methods and data-free runs: proportional) or "proportional" (one
            ratio for every compressed part); pipeline/budget_split.py.

    Returns:
        CompressSummary: the file's path, its byte counts and the achieved ratio.

    Example:
        >>> prinmix.compress("base/", "ft/", "ft.delta", "1/16",
        ...                  calibration=CalibrationConfig(nsamples=64, seqlen=1024))
    """
    base, finetuned = _model_location(base, "base"), _model_location(finetuned, "finetuned")
    job = CompressJob.create(base, finetuned, output, ratio, method, config, calibration, distill_steps,
                             base_revision, finetuned_revision, exact_embeddings, vocab_share, split)
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
    return write_merged_checkpoint(_model_location(base, "base"), delta_path, output, overwrite, progress, revision, max_shard_size, dtype)


def load_delta(path: PathLike) -> DeltaFile:
    """Read and validate a delta file (every header field and checksum; see docs/format.md).

    Args:
        path: the delta file.

    Returns:
        DeltaFile: method, ratio, params, the compressed matrices, exact tensors/rows, base fingerprint.

    Example:
        >>> delta = prinmix.load_delta("ft.delta"); delta.method
        'prinmix'
    """
    return _load_delta(path)


def info(delta_path: PathLike) -> DeltaInfo:
    """Method, ratios, true bytes, base fingerprint and per-matrix bit allocation of a delta file.

    Args:
        delta_path: the delta file (read and verified without torch: checksums, tensor list, blob headers;
            see format/delta_info.py).

    Returns:
        DeltaInfo (`.to_dict()` is `prinmix info --json`).

    Example:
        >>> prinmix.info("ft.delta").ratio_achieved
        0.0624...
    """
    return describe_delta(delta_path)


def evaluate_deltas(base: PathLike, deltas: Sequence[PathLike], finetuned: PathLike | None = None,
             config: EvalConfig | None = None, progress: Callable[[int, int, str], None] | None = None,
             log: Callable[[str], None] | None = None) -> dict:
    """Measure what deltas lost: the Eq. 1 layer error, perplexity and task accuracy (`prinmix eval`).

    (Named evaluate_deltas because `prinmix.evaluate` is the package of the measurements.)

    Args:
        base: the base model (a directory or a Hub id).
        deltas: delta files, compared side by side (labelled by file stem).
        finetuned: the fine-tune (needed for the Eq. 1 error; also evaluated).
        config: what to measure and how (EvalConfig: metrics, tasks, windows, device, dtype, …).
        progress: None or a callable(done_layers, total_layers, message) of the Eq. 1 pass.
        log: None or a callable(line) for progress messages.

    Returns:
        The JSON-ready result dict (evaluate/run.py documents its shape; evaluate.results writes its files).

    Example:
        >>> res = prinmix.evaluate_deltas("base/", ["a.delta"], "ft/", prinmix.EvalConfig(metrics="error,ppl"))
    """
    base = _model_location(base, "base")
    finetuned = None if finetuned is None else _model_location(finetuned, "finetuned")
    return run_eval(base, list(deltas), finetuned=finetuned, config=config, progress=progress, log=log)


def report(delta_path: PathLike, out_dir: PathLike | None = None, eval_json: PathLike | None = None,
           base: PathLike | None = None, finetuned: PathLike | None = None, options: ReportOptions | None = None,
           log: Callable[[str], None] | None = None) -> Path:
    """Write the HTML report of a delta's bit allocation (`prinmix report`; needs matplotlib).

    Args:
        delta_path: the delta file.
        out_dir: output directory (default: `<delta stem>-report` beside the delta).
        eval_json: a results .json of `prinmix eval -o` / `prinmix.evaluate` + `write_results`.
        base, finetuned: both or neither; with them σ and the rank order come from the true ΔW's SVD.
        options: ReportOptions (held-out text, Fig. 2 matrices, device).
        log: None or a callable(line).

    Returns:
        Path of the written index.html.
    """
    if base is not None:
        base = _model_location(base, "base")
    if finetuned is not None:
        finetuned = _model_location(finetuned, "finetuned")
    return build_report(delta_path, out_dir, eval_json=eval_json, base=base, finetuned=finetuned, options=options,
                        log=log)


def export_lora(base: PathLike, delta_path: PathLike, out_dir: PathLike, max_rank: int | None = None,
                dtype: torch.dtype = torch.float16, allow_lossy: bool = False, overwrite: bool = False,
                check: bool = True, finetuned: PathLike | None = None, check_text: str | None = None,
                check_tokens: int = 512) -> dict:
    """Write a delta — the whole fine-tune: linears, norms folded into them, embedding / lm_head rows — as a
    PEFT LoRA adapter (`prinmix export-lora`; e.g. for vLLM's --enable-lora).

    Args:
        base: the base the delta was made for (a checkpoint directory).
        delta_path: the delta file.
        out_dir: the adapter directory to write (adapter_config.json + adapter_model.safetensors).
        max_rank: truncate modules of larger rank to their best rank-R approximation (a vLLM rank).
        dtype: the factors' dtype. allow_lossy: export although tensors no adapter carries (biases, residual
            norms…) are left out. overwrite: replace a non-empty out_dir.
        check: compare base + adapter (PEFT) with `prinmix merge` on check_text (check_tokens tokens; the
            built-in text when None), and with the fine-tune's logits when `finetuned` is given.

    Returns:
        The export report: ranks, relative errors, what was left out, the vLLM rank to serve it with, and
        under "whole_model" the check's greedy agreement and logit errors (None without check).
    """
    return _export_lora(_model_location(base, "base"), delta_path, out_dir, max_rank=max_rank, dtype=dtype,
                        allow_lossy=allow_lossy, overwrite=overwrite, check=check, finetuned=finetuned,
                        check_text=check_text, check_tokens=check_tokens)
