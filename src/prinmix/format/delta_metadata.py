"""The delta file's metadata (the "prinmix" JSON of its safetensors header): read, checksum, validate.

Plain Python, numpy and safetensors only — no torch — so that `prinmix info` starts fast; load_delta
(delta_file.py) reads the metadata through `read_metadata` before it touches a tensor. The fields are
described in delta_file.py's docstring and docs/format.md.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from safetensors import SafetensorError, safe_open

from ..algorithms.methods import METHOD_NAMES
from ..errors import DeltaFormatError
from .file_names import aux_name_problem

__all__ = ["FORMAT_VERSION", "READABLE_VERSIONS", "METADATA_KEY", "METADATA_SHA256_FIELD", "TENSOR_NAME_MAX_CHARS",
           "metadata_digest", "metadata_problem", "read_metadata", "tensor_key_problem", "is_tensor_name"]

FORMAT_VERSION = 2            # 2: compressed vocabulary-row deltas ("vocab"); version-1 files are still read
READABLE_VERSIONS = (1, 2)
METADATA_KEY = "prinmix"
METADATA_SHA256_FIELD = "metadata_sha256"
TENSOR_NAME_MAX_CHARS = 1000



def metadata_digest(meta: dict) -> str:
    """sha256 (hex) of the canonical JSON (sorted keys, ASCII) of META without its own digest field."""
    rest = {k: v for k, v in meta.items() if k != METADATA_SHA256_FIELD}
    return hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_sha256(v) -> bool:
    return isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v)


def _is_shape(v) -> bool:
    return isinstance(v, list) and len(v) == 2 and all(_is_int(x) and 0 < x < 2 ** 40 for x in v)


def is_tensor_name(v) -> bool:
    return isinstance(v, str) and 0 < len(v) <= TENSOR_NAME_MAX_CHARS and v.isprintable()


def metadata_problem(meta) -> str | None:
    """Why the decoded "prinmix" JSON is not a valid delta description (types and names), or None."""
    if not isinstance(meta, dict):
        return "metadata is not a JSON object"
    version = meta.get("format_version")
    if version not in READABLE_VERSIONS or not _is_int(version):
        return (f"format version {version!r} is not supported "
                f"(this prinmix reads {', '.join(map(str, READABLE_VERSIONS))})")
    for key in ("method", "ratio", "params", "matrices", "rows", "base_fingerprint", "checksums"):
        if key not in meta:
            return f"metadata lacks '{key}'"
    if meta["method"] not in METHOD_NAMES:
        return f"unknown method {meta['method']!r} (known: {', '.join(METHOD_NAMES)})"
    ratio = meta["ratio"]
    if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not 0 < ratio < float("inf"):
        return f"ratio {ratio!r} is not a positive number"
    for key in ("params", "matrices", "rows", "base_fingerprint", "checksums", "stats"):
        if key in meta and not isinstance(meta[key], dict):
            return f"'{key}' is a {type(meta[key]).__name__}, not a JSON object"
    for key in ("matrices", "rows"):
        for name, shape in meta[key].items():
            if not is_tensor_name(name) or not _is_shape(shape):
                return f"'{key}' entry {name[:80]!r}: {str(shape)[:40]} is not a name → [int, int] of positive sizes"
    vocab = meta.get("vocab", {})
    if not isinstance(vocab, dict):
        return "'vocab' is not a JSON object"
    for name, shape in vocab.items():
        if not is_tensor_name(name) or not isinstance(shape, list) or len(shape) != 3 \
                or not _is_shape(shape[:2]) or not _is_int(shape[2]) or not 0 < shape[2] <= shape[0]:
            return f"'vocab' entry {name[:80]!r}: {str(shape)[:40]} is not a name → [rows, d, changed rows]"
    for name, digest in meta["checksums"].items():
        if not _is_sha256(digest):
            return f"checksum of {name[:80]!r} is not a sha256 hex digest"
    fp = meta["base_fingerprint"]
    if not all(isinstance(fp.get(k), str) for k in ("model_type", "content_hash")):
        return "base_fingerprint lacks its model_type / content_hash strings"
    params = meta["params"]
    removed = params.get("removed_tensors", [])
    if not isinstance(removed, list) or not all(is_tensor_name(n) for n in removed):
        return "params.removed_tensors is not a list of tensor names"
    from_base = params.get("aux_from_base", {})
    if not isinstance(from_base, dict):
        return "params.aux_from_base is not a JSON object"
    for name, digest in from_base.items():
        problem = aux_name_problem(name)
        if problem:
            return f"params.aux_from_base: {problem}"
        if not _is_sha256(digest):
            return f"params.aux_from_base: the digest of {name!r} is not a sha256 hex digest"
    return None


def read_metadata(path: str | os.PathLike) -> dict:
    """The JSON metadata of a delta file, validated; raises DeltaFormatError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise DeltaFormatError(f"{path}: no such delta file")
    try:
        with safe_open(str(path), framework="numpy") as f:  # "numpy": reading the header imports no torch
            header = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise DeltaFormatError(f"{path}: not a readable delta file (truncated or corrupted?): {e}") from None
    raw = header.get(METADATA_KEY)
    if raw is None:
        raise DeltaFormatError(f"{path}: a safetensors file, but not a prinmix delta (no '{METADATA_KEY}' metadata)")
    try:
        meta = json.loads(raw)
    except (json.JSONDecodeError, RecursionError) as e:
        raise DeltaFormatError(f"{path}: corrupted metadata: {e}") from None
    if not isinstance(meta, dict):
        raise DeltaFormatError(f"{path}: metadata is not a JSON object")
    digest = meta.get(METADATA_SHA256_FIELD)
    if digest is None:
        raise DeltaFormatError(f"{path}: its metadata has no checksum ('{METADATA_SHA256_FIELD}'; written by a "
                               f"prinmix before metadata checksums?): compress it again")
    if digest != metadata_digest(meta):
        raise DeltaFormatError(f"{path}: checksum mismatch in its metadata (corrupted file)")
    problem = metadata_problem(meta)
    if problem:
        raise DeltaFormatError(f"{path}: {problem}")
    return meta


def tensor_key_problem(key: str, meta: dict) -> str | None:
    """Why safetensors key KEY is not one the metadata describes, or None."""
    kind, _, name = key.partition("/")
    if kind == "linear" and name in meta["matrices"]:
        return None
    if kind == "dense" and is_tensor_name(name):
        return None
    if kind == "rows" and (name.endswith("/index") or name.endswith("/values")) \
            and name.rsplit("/", 1)[0] in meta["rows"]:
        return None
    if kind == "vocab" and (name.endswith("/rows") or name.endswith("/delta")) \
            and name.rsplit("/", 1)[0] in meta.get("vocab", {}):
        return None
    if kind == "aux":
        return aux_name_problem(name)
    return f"tensor {key[:80]!r} is not one the format defines"
