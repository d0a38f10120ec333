"""Calibration token windows for layer-wise compression.

`load_calibration(source, tokenizer, nsamples, seqlen, seed)` tokenises a text source and returns
`nsamples` windows of `seqlen` consecutive tokens starting at seeded random offsets of the
concatenated token stream (windows may overlap; no special tokens are added).

Sources: None / "builtin" (the package's docstring text, src/prinmix/data/calibration.txt), a local
.txt / .jsonl / .parquet file, or a Hugging Face dataset name ("c4", "wikitext2", "org/name",
"org/name:config"), the latter through the optional `datasets` package.
"""

from __future__ import annotations

import json
import warnings
from importlib import resources
from pathlib import Path
from typing import Iterable, Iterator

import torch

from prinmix.errors import PrinmixError

BUILTIN_NAMES = (None, "builtin")
LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")
# Record fields holding conversation turns, and the per-turn text field names.
CONVERSATION_FIELDS = ("messages", "conversations", "conversation")
TURN_TEXT_FIELDS = ("content", "value", "text")
# Known short dataset names -> (path, config, data_files) for datasets.load_dataset.
HF_ALIASES = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", None),
    "wikitext": ("wikitext", "wikitext-2-raw-v1", None),
    "c4": ("allenai/c4", None, {"train": "en/c4-train.00000-of-01024.json.gz"}),
}
# Tokenise documents in pieces of at most this many characters (keeps tokenizer warnings quiet).
PIECE_CHARS = 2000
# Stop reading a large source after this many characters per needed token.
CHARS_PER_NEEDED_TOKEN = 16
MIN_CHARS = 2_000_000


def builtin_text() -> str:
    """The package's built-in calibration text without its licence header lines."""
    text = resources.files("prinmix").joinpath("data/calibration.txt").read_text(encoding="utf-8")
    lines = text.splitlines(keepends=True)
    start = 0
    while start < len(lines) and (lines[start].startswith("#") or not lines[start].strip()):
        start += 1
    return "".join(lines[start:])


def context_length(config) -> int | None:
    """The longest sequence the model takes (its text config's max_position_embeddings), None when unset."""
    n = getattr(config.get_text_config() if hasattr(config, "get_text_config") else config,
                "max_position_embeddings", None)
    return int(n) if isinstance(n, int) and n > 0 else None


def clamp_seqlen(seqlen: int, config, flag: str = "--seqlen") -> int:
    """seqlen, or the model's context length when seqlen exceeds it (saying so once, as a UserWarning).

    The defaults (compress 2048, eval 512) suit real LLMs; a window longer than the model's positions
    would run it past what it was trained on (or fail), so the window is shortened rather than refused.
    """
    ctx = context_length(config)
    if ctx is not None and seqlen > ctx:
        warnings.warn(f"{flag} {seqlen} exceeds the model's context length of {ctx} tokens; using {ctx}",
                      UserWarning, stacklevel=3)
        return ctx
    return seqlen


def load_calibration(
    source: str | None,
    tokenizer,
    nsamples: int,
    seqlen: int,
    seed: int = 0,
) -> torch.Tensor:
    """LongTensor [nsamples, seqlen] of calibration token ids, deterministic for a given seed.

    The text of `source` is tokenised (without special tokens) into one stream; each window starts
    at an offset drawn uniformly from [0, n_tokens - seqlen] by a torch.Generator seeded with
    `seed`. Raises PrinmixError when the source is unusable or yields fewer than seqlen tokens.
    """
    if nsamples < 1 or seqlen < 1:
        raise ValueError(f"nsamples and seqlen must be >= 1, got {nsamples} and {seqlen}")
    label = "builtin calibration text" if source in BUILTIN_NAMES else str(source)
    max_chars = max(MIN_CHARS, CHARS_PER_NEEDED_TOKEN * nsamples * seqlen)
    tokens = tokenise_documents(read_documents(source, max_chars), tokenizer, label)
    if tokens.numel() < seqlen:
        raise PrinmixError(f"{label}: only {tokens.numel()} tokens, fewer than seqlen={seqlen}")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seqlen + 1, (nsamples,), generator=generator)
    return torch.stack([tokens[s : s + seqlen] for s in starts.tolist()])


# --------------------------------------------------------------------------- text sources
def read_documents(source: str | None, max_chars: int) -> Iterator[str]:
    if source in BUILTIN_NAMES:
        yield builtin_text()
        return
    path = Path(source).expanduser()
    if path.exists() or path.suffix.lower() in LOCAL_SUFFIXES:
        yield from _limit(_local_documents(path), max_chars)
        return
    yield from _limit(_hf_documents(source), max_chars)


def _limit(documents: Iterable[str], max_chars: int) -> Iterator[str]:
    total = 0
    for document in documents:
        yield document
        total += len(document)
        if total >= max_chars:
            return


def _local_documents(path: Path) -> Iterator[str]:
    if not path.exists():
        raise PrinmixError(f"{path}: no such calibration file")
    if not path.is_file():
        raise PrinmixError(f"{path}: not a file (expected .txt, .jsonl or .parquet)")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        yield _read_text(path)
    elif suffix == ".jsonl":
        yield from _jsonl_documents(path)
    elif suffix == ".parquet":
        yield from _parquet_documents(path)
    else:
        raise PrinmixError(f"{path}: unsupported calibration file type {suffix or '(none)'!r} (use .txt, .jsonl or .parquet)")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PrinmixError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    except UnicodeDecodeError as exc:
        raise PrinmixError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc


def record_text(record: dict) -> str:
    """Text of one JSON record: its "text" field; else the turns of "messages"/"conversations";
    else all top-level string fields (prompt, answer, ...) in record order, joined by newlines."""
    text = record.get("text")
    if isinstance(text, str):
        return text
    for field_name in CONVERSATION_FIELDS:
        turns = record.get(field_name)
        if isinstance(turns, list):
            pieces = []
            for turn in turns:
                if isinstance(turn, dict):
                    pieces.extend(turn[k] for k in TURN_TEXT_FIELDS if isinstance(turn.get(k), str))
                elif isinstance(turn, str):
                    pieces.append(turn)
            if pieces:
                return "\n".join(pieces)
    return "\n".join(v for v in record.values() if isinstance(v, str))


def iter_jsonl_objects(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSONL file; one-line PrinmixError naming the file
    (and line) when it cannot be read, a line is not JSON, or a line is not a JSON object."""
    try:
        handle = open(path, encoding="utf-8")
    except OSError as exc:
        raise PrinmixError(f"{path}: cannot read ({exc.strerror or exc})") from None
    with handle:
        try:
            for line_number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise PrinmixError(f"{path}:{line_number}: not valid JSON ({exc.msg})") from None
                if not isinstance(record, dict):
                    raise PrinmixError(f"{path}:{line_number}: expected a JSON object per line")
                yield line_number, record
        except UnicodeDecodeError as exc:
            raise PrinmixError(f"{path}: not UTF-8 text ({exc.reason})") from None


def _jsonl_documents(path: Path) -> Iterator[str]:
    for _, record in iter_jsonl_objects(path):
        text = record_text(record)
        if text:
            yield text


def _parquet_documents(path: Path) -> Iterator[str]:
    try:
        import pyarrow.parquet as parquet
    except ImportError:
        raise PrinmixError(f"{path}: reading .parquet needs pyarrow (pip install pyarrow)") from None
    try:
        table = parquet.read_table(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError
        raise PrinmixError(f"{path}: cannot read parquet ({exc})") from exc
    for record in table.to_pylist():
        text = record_text(record)
        if text:
            yield text


def _hf_documents(name: str) -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise PrinmixError(
            f"{name}: not a local file, and loading Hugging Face datasets needs the `datasets` package "
            "(pip install datasets), or pass a local .txt/.jsonl/.parquet file"
        ) from None
    path, config, data_files = HF_ALIASES.get(name, (name, None, None))
    if name not in HF_ALIASES and ":" in name:
        path, config = name.split(":", 1)
    try:
        dataset = datasets.load_dataset(path, config, data_files=data_files, split="train", streaming=True)
        for record in dataset:
            text = record_text(record)
            if text.strip():
                yield text
    except PrinmixError:
        raise
    except Exception as exc:  # offline, unknown name, gated dataset ...
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PrinmixError(
            f"{name}: cannot load Hugging Face dataset {path!r} ({first_line}); "
            "use a local .txt/.jsonl/.parquet file when offline"
        ) from exc


# --------------------------------------------------------------------------- tokenisation
def _pieces(text: str) -> Iterator[str]:
    """Split text into consecutive pieces of at most ~PIECE_CHARS characters at line ends."""
    start = 0
    while start < len(text):
        end = start + PIECE_CHARS
        if end < len(text):
            cut = text.rfind("\n", start, end)
            end = cut + 1 if cut > start else end
        yield text[start:end]
        start = end


def tokenise_documents(documents: Iterable[str], tokenizer, label: str) -> torch.Tensor:
    """Concatenated token ids (LongTensor [n_tokens]) of the documents, separated by blank lines."""
    ids: list[int] = []
    batch: list[str] = []

    def flush() -> None:
        if batch:
            encoded = tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]  # a stream, cut later
            for piece_ids in encoded:
                ids.extend(piece_ids)
            batch.clear()

    for index, document in enumerate(documents):
        text = document if index == 0 else "\n\n" + document
        for piece in _pieces(text):
            batch.append(piece)
            if len(batch) >= 256:
                flush()
    flush()
    if not ids:
        raise PrinmixError(f"{label}: no text to calibrate on")
    return torch.tensor(ids, dtype=torch.long)
