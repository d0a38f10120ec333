"""`run_eval`: the Python API behind `prinmix eval`. It measures every delta given (and the base and
fine-tune where the metric applies) and returns one JSON-ready dict:

    {"prinmix_eval": 1, "base", "finetuned", "settings",
     "models": [{"label", "kind": base|finetuned|delta, "path", "method", "ratio_requested", "ratio_achieved",
                 "linear_bytes"}],
     "layer_error": LayerErrorResult.to_dict() (Eq. 1; deltas only; needs FT),
     "perplexity": {"settings", "results": {label: {"ppl", "nll", "tokens", ...}}},
     "tasks": {"settings", "results": {label: {task: {"accuracy", "correct", "n", ...} or lm-eval metrics}}}}
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from ..calibration.data import clamp_seqlen
from ..checkpoint.apply_delta import check_base
from ..checkpoint.reader import CheckpointReader
from ..device import resolve_device
from ..errors import PrinmixError
from ..format.delta_file import DeltaFile, read_metadata
from . import layer_error as le
from . import perplexity as pp
from . import tasks as tk
from .results import EVAL_FORMAT, format_cell, task_score

__all__ = ["ALL_METRICS", "EvalConfig", "parse_metrics", "run_eval"]

ALL_METRICS = ("error", "ppl", "tasks")


@dataclass(frozen=True)
class EvalConfig:
    """What `run_eval` measures and how (the flags of `prinmix eval`).

    metrics: comma-separated or a list of error/ppl/tasks (None: error if FT, ppl, tasks if tasks).
    tasks: .jsonl files of {"prompt", "answer"} (exact match) and/or lm-eval task names.
    calib, nsamples × seqlen, seed: the held-out windows of the Eq. 1 error (seed None: 1234).
    ppl_data, ppl_seqlen, ppl_stride (None: = seqlen), ppl_tokens (None: 16384): the perplexity text.
    limit: items per task; max_new_tokens: greedy tokens per answer (None: longest answer + 2);
    num_fewshot: lm-eval only. batch_size, device ("auto", "cpu", "cuda"), dtype: how models run.
    """

    metrics: list[str] | str | None = None
    tasks: tuple[str, ...] = ()
    calib: str | None = None
    nsamples: int = 16
    seqlen: int = 512
    seed: int | None = None
    ppl_data: str | None = None
    ppl_seqlen: int = 512
    ppl_stride: int | None = None
    ppl_tokens: int | None = None
    limit: int | None = None
    batch_size: int = 8
    max_new_tokens: int | None = None
    num_fewshot: int | None = None
    device: str = "auto"
    dtype: str = "float32"


def parse_metrics(spec: str | None, finetuned, tasks) -> list[str]:
    """Metrics to run. Default: error (when FT is given), ppl, and tasks (when task specs are given)."""
    if spec is None:
        chosen = (["error"] if finetuned else []) + ["ppl"] + (["tasks"] if tasks else [])
    else:
        chosen = [m.strip() for m in spec.split(",") if m.strip()]
        unknown = [m for m in chosen if m not in ALL_METRICS]
        if unknown or not chosen:
            raise PrinmixError(f"--metrics {spec!r}: choose among {', '.join(ALL_METRICS)} (comma-separated)")
    if "error" in chosen and not finetuned:
        raise PrinmixError("--metrics error needs --finetuned FT (the true delta and the fine-tune's activations)")
    if "tasks" in chosen and not tasks:
        raise PrinmixError("--metrics tasks needs --tasks (a .jsonl file of {\"prompt\", \"answer\"} or lm-eval task names)")
    return list(dict.fromkeys(chosen))


def run_eval(base, deltas, finetuned=None, config: EvalConfig | None = None,
             progress: Callable[[int, int, str], None] | None = None,
             log: Callable[[str], None] | None = None) -> dict:
    """Evaluate deltas against BASE (and FT): Eq. 1 layer errors, perplexity, task accuracy (module doc).

    Args:
        base: the base checkpoint; deltas: delta files (labelled by file stem); finetuned: the fine-tune
        (needed for the Eq. 1 error, and evaluated itself). config: what to measure and how (EvalConfig).
        progress: callable(done_layers, total_layers, message) of the Eq. 1 pass; log: callable(line).

    Returns:
        The JSON-ready result dict (its shape in the module docstring).
    """
    c = config or EvalConfig()
    metrics, calib, nsamples, seqlen, seed = c.metrics, c.calib, c.nsamples, c.seqlen, c.seed
    ppl_data, ppl_seqlen, ppl_stride, ppl_tokens = c.ppl_data, c.ppl_seqlen, c.ppl_stride, c.ppl_tokens
    limit, batch_size, max_new_tokens, num_fewshot = c.limit, c.batch_size, c.max_new_tokens, c.num_fewshot
    device, dtype, tasks = c.device, c.dtype, c.tasks
    log = log or (lambda msg: None)
    tasks = list(tasks or [])
    if isinstance(metrics, (list, tuple)):
        metrics = ",".join(metrics)
    chosen = parse_metrics(metrics, finetuned, tasks)
    if not deltas:
        raise PrinmixError("no delta file given")
    for flag, value in (("nsamples", nsamples), ("seqlen", seqlen), ("ppl-seqlen", ppl_seqlen),
                        ("ppl-stride", ppl_stride), ("ppl-tokens", ppl_tokens), ("limit", limit),
                        ("batch-size", batch_size), ("max-new-tokens", max_new_tokens)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise PrinmixError(f"--{flag} must be a positive integer, got {value!r}")
    seed = le.HELD_OUT_SEED if seed is None else seed
    ppl_tokens = ppl_tokens or pp.DEFAULT_MAX_TOKENS
    base_config = CheckpointReader(base).config  # validate early: one-line errors before any work
    if "error" in chosen:  # windows longer than the model's context are shortened, saying so once each
        seqlen = clamp_seqlen(seqlen, base_config, "--seqlen")
    if "ppl" in chosen:
        ppl_seqlen = clamp_seqlen(ppl_seqlen, base_config, "--ppl-seqlen")
        ppl_stride = min(ppl_stride, ppl_seqlen) if ppl_stride else None
    if finetuned is not None:
        CheckpointReader(finetuned)
    if "tasks" in chosen:
        for spec in tasks:
            if tk.is_task_file(spec):
                tk.read_task_file(spec, 1)
        tk.require_lm_eval([s for s in tasks if not tk.is_task_file(s)])
    entries = pp.model_entries(base, deltas, finetuned)
    _check_bases(base, [e.path for e in entries if e.kind == "delta"])
    labelled = {e.label: e.path for e in entries if e.kind == "delta"}
    dev = resolve_device(device)
    out = {"prinmix_eval": EVAL_FORMAT, "base": str(base), "finetuned": str(finetuned) if finetuned else None,
           "settings": {"metrics": chosen, "device": str(dev), "dtype": dtype},
           "models": [e.describe() for e in entries]}
    t0 = time.time()
    if "error" in chosen:
        log("Eq. 1 layer errors (fine-tune activations, held-out windows)")
        res = le.layer_errors(base, finetuned, labelled, calib=calib, nsamples=nsamples, seqlen=seqlen, seed=seed,
                              device=str(dev), batch_size=batch_size, progress=progress)
        out["layer_error"] = res.to_dict()
    if "ppl" in chosen or "tasks" in chosen:
        ids = None
        if "ppl" in chosen:
            tok = pp.reference_tokenizer(base, labelled, finetuned)
            ids = pp.text_token_ids(ppl_data, tok, ppl_tokens)
            out["perplexity"] = {"settings": {"data": ppl_data or "builtin", "tokens": int(ids.numel()),
                                              "seqlen": ppl_seqlen, "stride": ppl_stride or ppl_seqlen},
                                 "results": {}}
        if "tasks" in chosen:
            out["tasks"] = {"settings": {"tasks": tasks, "limit": limit, "max_new_tokens": max_new_tokens,
                                         "num_fewshot": num_fewshot, "decoding": "greedy",
                                         "matching": "first line of the stripped continuation == stripped answer"},
                            "results": {}}
        for entry in entries:
            log(f"loading {entry.label} ({entry.kind})")
            with pp.open_model(entry, base, dev, dtype) as (model, tok):
                if ids is not None:
                    try:
                        r = pp.perplexity(model, ids, ppl_seqlen, ppl_stride)
                        out["perplexity"]["results"][entry.label] = r.to_dict()
                        log(f"  perplexity {r.ppl:.4g}")
                    except PrinmixError as e:  # e.g. a base whose vocabulary lacks the fine-tune's new tokens
                        out["perplexity"]["results"][entry.label] = {"error": str(e)}
                        log(f"  perplexity: {e}")
                if "tasks" in chosen:
                    out["tasks"]["results"][entry.label] = tk.run_tasks(model, tok, tasks, limit, batch_size,
                                                                        max_new_tokens, num_fewshot)
                    log("  " + ", ".join(f"{k} {format_cell(k, task_score(v))}"
                                         for k, v in out["tasks"]["results"][entry.label].items()))
    out["seconds"] = time.time() - t0
    return out


def _check_bases(base, delta_paths) -> None:
    """BaseMismatchError before any model is loaded when a delta was made for another base."""
    base_r = CheckpointReader(base)
    for path in delta_paths:
        meta = read_metadata(path)
        check_base(base_r, DeltaFile(meta["method"], float(meta["ratio"]), meta["params"],
                                     base_fingerprint=meta["base_fingerprint"]), path)
