"""What a delta file holds, for `prinmix info` and the evaluation tables: method, ratios, true bytes,
base fingerprint and the per-matrix bit allocation — read without torch, so `prinmix info` starts fast.

`describe_delta` reads the whole file and checks what it reports on: the metadata (checksum, types),
the tensor list, every tensor's sha256, the dtypes and shapes, and each blob's block headers and sizes
(algorithms/blob_layout.py: the per-rank widths are there). Decoding the codes and checking every float
for NaN/Inf needs torch and is load_delta's job, done before a delta is used (merge, serve, export).
`delta_sizes` reads the header only (method, ratios and byte counts, without checksumming gigabytes).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, deserialize, safe_open

from ..algorithms.blob_layout import blob_blocks
from ..algorithms.budget import storage_ratio
from ..errors import DeltaFormatError
from .byte_counts import matrix_header_bytes, weight_bytes_by_part, whole_delta_entries
from .delta_metadata import read_metadata, tensor_key_problem

__all__ = ["DeltaInfo", "DeltaSizes", "MatrixInfo", "delta_sizes", "describe_delta", "rerun_settings"]

# safetensors dtype → bytes per entry, of what a delta stores (blobs U8, row ids I64, exact tensors in the
# fine-tune's float dtype)
FLOAT_DTYPES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}


@dataclass(frozen=True)
class MatrixInfo:
    """One compressed linear: shape [h_out, h_in], stored bytes, kept rank, {width: ranks} (widest first)."""

    shape: list[int]
    bytes: int
    rank: int
    widths: dict[str, int]
    ratio: float


@dataclass(frozen=True)
class DeltaSizes:
    """The sizes of a delta file, from its header. Ratios are of the linear deltas' 16-bit size."""

    path: str
    method: str
    ratio_requested: float
    linear_bytes: int
    linear_header_bytes: int
    dense_delta_params: int

    @property
    def ratio_achieved(self) -> float:
        return storage_ratio(self.linear_bytes, self.dense_delta_params)


@dataclass(frozen=True)
class DeltaInfo:
    """Everything `prinmix info` shows. to_dict() is the `--json` output."""

    path: str
    method: str
    ratio_requested: float
    lora_adapter_bytes: int | None
    ratio_vs_adapter: float | None
    ratio_achieved: float
    linear_header_bytes: int
    ratio_on_disk: float
    file_bytes: int
    linear_bytes: int
    other_bytes: int
    aux_bytes: int
    dense_delta_params: int
    base: dict
    matrices: dict[str, MatrixInfo]
    other_tensors: list[str]
    settings: dict  # what the delta was made with, enough to rerun it (rerun_settings)
    whole_mode: bool = False   # the ratio was requested of the whole delta (not --exact-embeddings)
    ratio_whole: float = 0.0   # all weight bytes (with header entries) / 16-bit size of what differs
    whole_params: int = 0      # entries of what differs (DeltaFile.whole_delta_params)
    weight_bytes: dict | None = None   # DeltaFile.weight_bytes(): linear / vocab {name} / exact / total
    vocab: dict | None = None  # {name: {"shape", "rows", "rank", "bytes"}}: compressed vocabulary row deltas

    def to_dict(self) -> dict:
        return asdict(self)


def rerun_settings(method: str, ratio: float, params: dict) -> dict:
    """The settings of a delta's compress run, from its metadata (None where an older file lacks one):
    method, ratio, calibration source, nsamples, seqlen, seed, candidate widths, f_max, distillation
    steps and the prinmix version that wrote it."""
    config = params.get("config") or {}
    return {"method": method, "ratio": ratio, "calib": params.get("calib") or "builtin",
            "nsamples": params.get("nsamples"), "seqlen": params.get("seqlen"), "seed": params.get("seed"),
            "widths": config.get("widths"), "fmax": config.get("fmax"),
            "distill_steps": params.get("distill_steps", 0), "prinmix_version": params.get("prinmix_version")}


def _block_widths(blocks: list[tuple[int, int]]) -> dict[str, int]:
    """{width: ranks}, widest first, of a blob's (bits, k) blocks."""
    counts: dict[int, int] = {}
    for bits, k in blocks:
        counts[bits] = counts.get(bits, 0) + k
    return {str(b): counts[b] for b in sorted(counts, reverse=True)}


def _read_tensors(path: Path, meta: dict) -> dict[str, dict]:
    """{key: {"dtype", "shape", "data"}} of every tensor of the file, each checked against its sha256.

    safetensors' own `deserialize` (no torch; safe_open(framework="numpy") cannot return the bfloat16
    tensors a delta of a bf16 model holds, numpy having no bfloat16). It reads the whole file, as load_delta
    does: a delta is a few per cent of its model."""
    try:
        tensors = dict(deserialize(path.read_bytes()))
    except (SafetensorError, OSError, ValueError) as e:
        raise DeltaFormatError(f"{path}: cannot read tensors (truncated or corrupted?): {e}") from None
    checksums: dict = meta["checksums"]
    if set(tensors) != set(checksums):
        raise DeltaFormatError(f"{path}: tensor list does not match its metadata")
    for k in sorted(tensors):
        problem = tensor_key_problem(k, meta)
        if problem:
            raise DeltaFormatError(f"{path}: {problem}")
    for k in sorted(tensors):
        if hashlib.sha256(tensors[k]["data"]).hexdigest() != checksums[k]:
            raise DeltaFormatError(f"{path}: checksum mismatch in tensor '{k}' (corrupted file)")
    return tensors


def _blob(path: Path, tensors: dict, key: str, what: str) -> bytes:
    t = tensors.get(key)
    if t is None or t["dtype"] != "U8" or len(t["shape"]) != 1:
        raise DeltaFormatError(f"{path}: {what} is missing or malformed")
    return t["data"]


def describe_delta(path: str | os.PathLike) -> DeltaInfo:
    """Method, ratio, true bytes, base fingerprint and per-matrix bit allocation of a delta file, with its
    checksums, tensor list, dtypes, shapes and blob headers verified (module docstring). No torch."""
    path = Path(path)
    meta = read_metadata(path)
    tensors = _read_tensors(path, meta)
    per_matrix, blobs = {}, {}
    for name, shape in meta["matrices"].items():
        data = _blob(path, tensors, f"linear/{name}", f"matrix '{name}'")
        try:
            blocks = blob_blocks(data, shape)
        except ValueError as e:
            raise DeltaFormatError(f"{path}: matrix '{name}' is corrupted: {e}") from None
        blobs[name] = (len(data), shape)
        per_matrix[name] = MatrixInfo(list(shape), len(data), sum(k for _, k in blocks), _block_widths(blocks),
                                      storage_ratio(len(data), shape[0] * shape[1]))
    rows = {}
    for name, shape in meta["rows"].items():
        idx, values = tensors.get(f"rows/{name}/index"), tensors.get(f"rows/{name}/values")
        ids = np.frombuffer(idx["data"], "<i8") if idx is not None and idx["dtype"] == "I64" else None
        if ids is None or values is None or len(idx["shape"]) != 1 or values["dtype"] not in FLOAT_DTYPES \
                or values["shape"] != [ids.size, shape[1]] or (ids.size and not 0 <= ids.min() <= ids.max() < shape[0]):
            raise DeltaFormatError(f"{path}: row delta '{name}' is malformed")
        rows[name] = (len(idx["data"]) + len(values["data"]), ids.size, shape[1])
    vocab_blobs, vocab_ranks = {}, {}
    for name, (_, d, n) in meta.get("vocab", {}).items():
        row_set = _blob(path, tensors, f"vocab/{name}/rows", f"compressed rows of '{name}'")
        data = _blob(path, tensors, f"vocab/{name}/delta", f"compressed rows of '{name}'")
        try:
            vocab_ranks[name] = sum(k for _, k in blob_blocks(data, (n, d)))
        except ValueError as e:
            raise DeltaFormatError(f"{path}: compressed rows of '{name}' are malformed: {e}") from None
        vocab_blobs[name] = len(row_set) + len(data)
    dense, aux_bytes = {}, 0
    for k, t in tensors.items():
        if k.startswith("dense/"):
            dense[k[len("dense/"):]] = (len(t["data"]), len(t["shape"]), int(np.prod(t["shape"], dtype=np.int64)))
        elif k.startswith("aux/"):
            if t["dtype"] != "U8" or len(t["shape"]) != 1:
                raise DeltaFormatError(f"{path}: file '{k}' is not stored as bytes")
            aux_bytes += len(t["data"])

    params = sum(int(a) * int(b) for a, b in meta["matrices"].values())
    linear = sum(n for n, _ in blobs.values())
    adapter_bytes = meta["params"].get("lora_adapter_bytes")  # set when FINETUNED was a LoRA adapter
    weights = weight_bytes_by_part(blobs, vocab_blobs, {n: (b, ndim) for n, (b, ndim, _) in dense.items()},
                                   {n: b for n, (b, _, _) in rows.items()})
    vocab = {n: {"shape": [n_rows, d], "rows": k, "rank": vocab_ranks[n], "bytes": weights["vocab"][n]}
             for n, (n_rows, d, k) in meta.get("vocab", {}).items()}
    whole_params = whole_delta_entries(meta["matrices"].values(), [numel for _, _, numel in dense.values()],
                                       [(n, d) for _, n, d in rows.values()],
                                       [(n, d) for _, d, n in meta.get("vocab", {}).values()])
    header = sum(matrix_header_bytes(n, s) for n, s in meta["matrices"].items())
    return DeltaInfo(path=str(path), method=meta["method"], ratio_requested=float(meta["ratio"]),
                     lora_adapter_bytes=adapter_bytes,
                     ratio_vs_adapter=linear / adapter_bytes if adapter_bytes else None,
                     ratio_achieved=storage_ratio(linear, params), linear_header_bytes=header,
                     ratio_on_disk=storage_ratio(linear + header, params), file_bytes=path.stat().st_size,
                     linear_bytes=linear, other_bytes=sum(b for b, _, _ in dense.values())
                     + sum(b for b, _, _ in rows.values()), aux_bytes=aux_bytes,
                     dense_delta_params=params, base=meta["base_fingerprint"], matrices=per_matrix,
                     other_tensors=sorted(dense) + sorted(rows),
                     settings=rerun_settings(meta["method"], float(meta["ratio"]), meta["params"]),
                     whole_mode=bool(meta["params"].get("whole", False)),
                     ratio_whole=weights["total"] / (2 * whole_params) if whole_params else 0.0,
                     whole_params=whole_params, weight_bytes=weights, vocab=vocab)


def delta_sizes(path: str | os.PathLike) -> DeltaSizes:
    """Method, ratios and linear byte counts of a delta file from its header alone (validated metadata;
    the blobs' sizes are their lengths in the safetensors header; no tensor data is read)."""
    meta = read_metadata(path)
    try:
        with safe_open(str(path), framework="numpy") as f:
            linear = sum(f.get_slice(f"linear/{name}").get_shape()[0] for name in meta["matrices"])
    except SafetensorError as e:
        raise DeltaFormatError(f"{path}: a linear delta listed in the metadata is missing ({e})") from None
    shapes = meta["matrices"]
    return DeltaSizes(str(path), meta["method"], float(meta["ratio"]), linear,
                      sum(matrix_header_bytes(n, s) for n, s in shapes.items()),
                      sum(int(s[0]) * int(s[1]) for s in shapes.values()))
