"""Perplexity of the base, the fine-tune and each reconstruction (base + delta), side by side.

Text: one token stream made from a text source — the built-in text by default (offline; note that it
is also compression's default calibration text, so pass an independent set such as "wikitext2" or a
local .txt/.jsonl/.parquet file for a held-out number), a local file, or a Hugging Face dataset
(read exactly as prinmix.calibration.data reads calibration sources). The stream is tokenised once,
without special tokens, with the fine-tune's tokenizer, and cut to its first `max_tokens` tokens, so
every model sees the very same ids.

Strided evaluation (the usual sliding window): windows of `seqlen` tokens start every `stride`
tokens; each window scores only the tokens not scored by the previous window (the last
end − previous_end tokens), with the rest of the window as context. Every token of the stream but
the first is scored exactly once. perplexity = exp(Σ NLL / number of scored tokens), NLL in nats,
computed from float32 log-softmax of the logits. stride == seqlen gives disjoint windows.

Reconstructions are built by prinmix merge (checkpoint/merge_writer.py) into a temporary directory and loaded with
transformers exactly like a served checkpoint; one model is in memory at a time.
"""

from __future__ import annotations

import contextlib
import gc
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..calibration.data import BUILTIN_NAMES, CHARS_PER_NEEDED_TOKEN, MIN_CHARS, read_documents, tokenise_documents
from ..checkpoint.apply_delta import merged_aux_files
from ..checkpoint.merge_writer import write_merged_checkpoint
from ..checkpoint.reader import CheckpointReader
from ..errors import CheckpointError, PrinmixError
from ..format.delta_file import load_delta
from ..format.delta_info import delta_sizes, describe_delta
from .layer_error import label_deltas

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}
DEFAULT_MAX_TOKENS = 16384


# --------------------------------------------------------------------------- models
def load_model(model_dir, device="cpu", dtype: str = "float32"):
    """(model in eval mode on device, tokenizer) of a Hugging Face checkpoint directory."""
    if dtype not in DTYPES:
        raise PrinmixError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    path = Path(model_dir)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such model directory")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=DTYPES[dtype])
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot load the model ({str(e).strip().splitlines()[0]})") from None
    return model.to(device).eval(), tokenizer


@contextlib.contextmanager
def reconstructed_dir(base, delta_path, workdir=None, dtype: str | None = None) -> Iterator[Path]:
    """A temporary checkpoint directory holding base + delta (prinmix merge, `dtype` as merge's --dtype),
    removed afterwards."""
    tmp = Path(tempfile.mkdtemp(prefix="prinmix-eval-", dir=workdir))
    try:
        yield write_merged_checkpoint(base, delta_path, tmp / "model", overwrite=True, dtype=dtype)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@dataclass
class ModelEntry:
    """One model of an evaluation: the base, the fine-tune or a delta's reconstruction."""

    label: str
    kind: str                      # "base" | "finetuned" | "delta"
    path: str
    method: str | None = None
    ratio_requested: float | None = None
    ratio_achieved: float | None = None
    linear_bytes: int | None = None
    ratio_whole: float | None = None       # all weight bytes / 16-bit size of what differs
    part_bytes: dict | None = None         # {"linears", "<vocabulary matrix>"…, "exact"}: bytes with header entries

    def describe(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def delta_entries(deltas) -> list[ModelEntry]:
    """ModelEntry of each delta file (labelled by file stem, made unique), from its metadata only."""
    out = []
    for label, path in label_deltas(deltas).items():
        d = delta_sizes(path)
        whole = describe_delta(path)  # the whole-delta parts need the loaded file (vocabulary blobs, rows)
        w = whole.weight_bytes
        out.append(ModelEntry(label, "delta", str(path), d.method, d.ratio_requested, d.ratio_achieved,
                              d.linear_bytes, whole.ratio_whole,
                              {"linears": w["linear"], **w["vocab"], "exact": w["exact"]}))
    return out


def model_entries(base, deltas, finetuned=None, include_base: bool = True) -> list[ModelEntry]:
    """base (optional), finetuned (when given), then every delta's reconstruction."""
    out = [ModelEntry("base", "base", str(base))] if include_base else []
    if finetuned is not None:
        out.append(ModelEntry("finetuned", "finetuned", str(finetuned)))
    return out + delta_entries(deltas)


@contextlib.contextmanager
def open_model(entry: ModelEntry, base, device="cpu", dtype: str = "float32", workdir=None):
    """(model, tokenizer) of one ModelEntry; freed on exit."""
    model = None
    try:
        if entry.kind == "delta":
            with reconstructed_dir(base, entry.path, workdir) as d:
                model, tok = load_model(d, device, dtype)
        else:
            model, tok = load_model(entry.path, device, dtype)
        yield model, tok
    finally:
        del model
        gc.collect()


def reference_tokenizer(base, deltas, finetuned=None):
    """The tokenizer every model's text is encoded with: the fine-tune's if given, else the one carried
    in the first delta file (its aux files), else the base's."""
    if finetuned is not None:
        src = Path(finetuned)
        return AutoTokenizer.from_pretrained(str(src))
    for _label, path in label_deltas(deltas).items():
        aux = merged_aux_files(CheckpointReader(base), load_delta(path), path)
        if aux:
            with tempfile.TemporaryDirectory(prefix="prinmix-tok-") as tmp:
                for name, data in aux.items():
                    (Path(tmp) / name).write_bytes(data)
                try:
                    return AutoTokenizer.from_pretrained(tmp)
                except Exception:  # noqa: BLE001 - fall back to the base's tokenizer
                    break
        break
    return AutoTokenizer.from_pretrained(str(base))



# --------------------------------------------------------------------------- text
def text_token_ids(source: str | None, tokenizer, max_tokens: int = DEFAULT_MAX_TOKENS) -> torch.Tensor:
    """LongTensor [n] of the first `max_tokens` tokens of the source's text stream (see module docstring)."""
    if max_tokens < 2:
        raise PrinmixError(f"perplexity needs at least 2 tokens, got max_tokens={max_tokens}")
    label = "builtin text" if source in BUILTIN_NAMES else str(source)
    documents = read_documents(source, max(MIN_CHARS, CHARS_PER_NEEDED_TOKEN * max_tokens))
    ids = tokenise_documents(documents, tokenizer, label)
    if ids.numel() < 2:
        raise PrinmixError(f"{label}: only {ids.numel()} token(s), too few for a perplexity")
    return ids[:max_tokens]


def strided_windows(n_tokens: int, seqlen: int, stride: int) -> list[tuple[int, int, int]]:
    """[(begin, end, n_scored)]: windows [begin, end) whose last n_scored tokens are scored."""
    if seqlen < 2 or not 1 <= stride <= seqlen:
        raise PrinmixError(f"need seqlen >= 2 and 1 <= stride <= seqlen, got seqlen={seqlen}, stride={stride}")
    out, prev_end, begin = [], 0, 0
    while True:
        end = min(begin + seqlen, n_tokens)
        out.append((begin, end, end - prev_end))
        prev_end = end
        if end == n_tokens:
            return out
        begin += stride


@dataclass
class PerplexityResult:
    ppl: float
    nll: float            # mean NLL per scored token (nats)
    tokens: int           # scored tokens
    windows: int
    seqlen: int
    stride: int

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def perplexity(model, ids: torch.Tensor, seqlen: int = 512, stride: int | None = None,
               device=None) -> PerplexityResult:
    """Strided perplexity of `model` on the token stream ids [n] (see the module docstring)."""
    stride = stride or seqlen
    ids = ids.reshape(-1).long()
    if device is None:
        device = next(model.parameters()).device
    vocab = model.get_output_embeddings().weight.shape[0] if model.get_output_embeddings() is not None else None
    if vocab is not None and int(ids.max()) >= vocab:
        raise PrinmixError(f"token id {int(ids.max())} is outside this model's vocabulary of {vocab}")
    total, count = 0.0, 0
    windows = strided_windows(ids.numel(), seqlen, stride)
    with torch.inference_mode():
        for begin, end, n_scored in windows:
            window = ids[begin:end].to(device)[None]
            logits = model(input_ids=window, use_cache=False).logits[0].float()
            first = max(end - begin - n_scored, 1)        # position 0 has no context
            if first >= end - begin:
                continue
            pred = logits[first - 1:end - begin - 1]
            target = window[0, first:]
            total += float(torch.nn.functional.cross_entropy(pred, target, reduction="sum"))
            count += int(target.numel())
    nll = total / count
    return PerplexityResult(math.exp(nll), nll, count, len(windows), seqlen, stride)
