"""The delta file: one safetensors container (see docs/format.md).

Tensors
    linear/<weight name>   uint8 blob of a CompressedLinear (codes, scales, zeros, widths, Σ)
    dense/<tensor name>    the fine-tune's tensor (norms, biases…) where it differs from the base, in the
                           fine-tune's own dtype (the base's 16-bit dtype for a wider fine-tune: merge
                           writes the base's dtype), so the merge reproduces it bit for bit
    rows/<name>/index      int64 [n] rows of an embedding / lm_head that differ from the base (or are new)
    rows/<name>/values     [n, d] those rows, exactly
    vocab/<name>/rows      uint8 row-set blob (algorithms/vocab_delta.py): the rows of an embedding / lm_head
                           whose delta is stored compressed
    vocab/<name>/delta     uint8 blob of a CompressedLinear [n, d]: the delta of those rows (whole-delta mode)
    aux/<file name>        uint8 bytes of config.json, tokenizer files, generation_config.json of the fine-tune
                           (those identical to the base's are in params["aux_from_base"] instead)
Metadata (the safetensors header's string map)
    "prinmix"              JSON: format_version, method, ratio, params, matrices {name: [h_out, h_in]},
                           rows {name: [n_rows_final, d]}, vocab {name: [n_rows_final, d, n]} (version 2),
                           base fingerprint, stats, and a sha256 per tensor.
                           Its field "metadata_sha256" is the sha256 (hex) of the canonical JSON of the
                           other fields (json.dumps(sort_keys=True), see metadata_digest).

Nothing in the file can execute code; every field is validated before use (`read_metadata`,
`load_delta`; against the base in models/apply_delta.check_base). The checksums detect accidental
corruption only: whoever crafts a file recomputes them. What protects a machine reading a crafted
file is the validation: aux file names are plain names (format/file_names.py), every JSON field has
its type, every stored float is finite, every tensor the metadata names is checked against the base
(docs/security.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..algorithms.budget import budget_bits
from ..algorithms.compressed_linear import CompressedLinear
from ..algorithms.vocab_delta import decode_row_set, encode_row_set
from ..errors import DeltaFormatError
from .byte_counts import (  # noqa: F401  (the header-byte bounds re-exported: the compressor sizes with them)
    dense_header_bytes,
    matrix_header_bytes,
    rows_header_bytes,
    vocab_header_bytes,
    weight_bytes_by_part,
    whole_delta_entries,
)
from .delta_metadata import (  # noqa: F401  (re-exported: the format's constants and metadata reader)
    FORMAT_VERSION,
    METADATA_KEY,
    METADATA_SHA256_FIELD,
    READABLE_VERSIONS,
    metadata_digest,
    metadata_problem,
    read_metadata,
    tensor_key_problem,
)
from .output_safety import apply_umask


@dataclass
class DeltaFile:
    """Everything a delta file holds, in memory."""

    method: str
    ratio: float
    params: dict
    matrices: dict[str, CompressedLinear] = field(default_factory=dict)
    dense: dict[str, torch.Tensor] = field(default_factory=dict)
    rows: dict[str, tuple[torch.Tensor, torch.Tensor, list[int]]] = field(default_factory=dict)
    # name → (row ids int64 [n] sorted, CompressedLinear [n, d] of those rows' delta, [n_rows_final, d])
    vocab: dict[str, tuple[torch.Tensor, CompressedLinear, list[int]]] = field(default_factory=dict)
    aux_files: dict[str, bytes] = field(default_factory=dict)
    base_fingerprint: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)

    def linear_bytes(self) -> int:
        return sum(m.nbytes() for m in self.matrices.values())

    def linear_header_bytes(self) -> int:
        """Upper bound of the header bytes the linear deltas add to the file (see matrix_header_bytes)."""
        return sum(matrix_header_bytes(n, m.shape) for n, m in self.matrices.items())

    def dense_bytes(self) -> int:
        """Bytes of the tensors stored exactly (norms, biases, exact embedding rows and their indices)."""
        n = sum(t.numel() * t.element_size() for t in self.dense.values())
        return n + sum(i.numel() * i.element_size() + v.numel() * v.element_size() for i, v, _ in self.rows.values())

    def vocab_bytes(self) -> dict[str, int]:
        """{name: bytes of its compressed row delta: row-set blob + delta blob}."""
        return {n: encode_row_set(idx, shape[0]).numel() + m.nbytes() for n, (idx, m, shape) in self.vocab.items()}

    def aux_bytes(self) -> int:
        return sum(len(b) for b in self.aux_files.values())

    def dense_delta_params(self) -> int:
        """Number of 16-bit delta parameters the compressed linears stand for."""
        return sum(m.shape[0] * m.shape[1] for m in self.matrices.values())

    def whole_delta_params(self) -> int:
        """Entries of what differs from the base, the 16-bit size of which the whole-delta ratio is of: whole
        matrices of the linears, the changed and new rows of embedding / lm_head, whole other tensors."""
        return whole_delta_entries([m.shape for m in self.matrices.values()],
                                   [t.numel() for t in self.dense.values()],
                                   [(i.numel(), shape[1]) for i, _, shape in self.rows.values()],
                                   [m.shape for _, m, _ in self.vocab.values()])

    def weight_bytes(self) -> dict:
        """Bytes stored for weights, by part, each with its header entries (byte_counts.weight_bytes_by_part):
        {"linear", "vocab": {name: bytes}, "exact", "total"}."""
        return weight_bytes_by_part(
            {n: (m.nbytes(), m.shape) for n, m in self.matrices.items()}, self.vocab_bytes(),
            {n: (t.numel() * t.element_size(), t.ndim) for n, t in self.dense.items()},
            {n: i.numel() * i.element_size() + v.numel() * v.element_size() for n, (i, v, _) in self.rows.items()})

def ratio_within_file(alpha: float, name: str, shape) -> float:
    """The ratio to compress matrix NAME at so that its blob plus its header entries fit α's budget.

    Budget floor(α·16·h_out·h_in) bits less 8·matrix_header_bytes. Decision: a matrix whose header entries
    would take more than a quarter of its budget (toy models: a 128×64 matrix has 1 KiB at α = 1/16, its
    name ~400 B of metadata) keeps the whole budget for its blob — halving a toy matrix's bytes for its
    name would only distort comparisons —; every matrix with a budget ≥ ~1.6 KiB (from ~115×115 at 1/16,
    ~160×160 at 1/32: every real LLM matrix) has its header taken off, so its on-disk bytes meet α.
    """
    h_out, h_in = int(shape[0]), int(shape[1])
    budget = budget_bits(alpha, h_out, h_in)
    reserve = 8 * matrix_header_bytes(name, shape)
    if 4 * reserve > budget:
        return alpha
    return (budget - reserve) / (16 * h_out * h_in)


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 of the tensor's bytes, read in place (no copy of a multi-GB embedding)."""
    flat = t.reshape(-1).contiguous().view(torch.uint8)
    return hashlib.sha256(memoryview(flat.numpy())).hexdigest()


def _to_tensors(delta: DeltaFile) -> tuple[dict[str, torch.Tensor], dict]:
    tensors: dict[str, torch.Tensor] = {}
    for name, m in delta.matrices.items():
        tensors[f"linear/{name}"] = m.to_blob()
    for name, t in delta.dense.items():
        tensors[f"dense/{name}"] = t.contiguous()
    for name, (idx, values, _) in delta.rows.items():
        tensors[f"rows/{name}/index"] = idx.to(torch.int64).contiguous()
        tensors[f"rows/{name}/values"] = values.contiguous()
    for name, (idx, m, shape) in delta.vocab.items():
        tensors[f"vocab/{name}/rows"] = encode_row_set(idx, shape[0])
        tensors[f"vocab/{name}/delta"] = m.to_blob()
    for name, data in delta.aux_files.items():
        tensors[f"aux/{name}"] = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else \
            torch.zeros(0, dtype=torch.uint8)
    meta = {
        "format_version": FORMAT_VERSION,
        "method": delta.method,
        "ratio": delta.ratio,
        "params": delta.params,
        "matrices": {n: list(m.shape) for n, m in delta.matrices.items()},
        "rows": {n: list(shape) for n, (_, _, shape) in delta.rows.items()},
        "vocab": {n: [int(shape[0]), int(shape[1]), int(m.shape[0])] for n, (_, m, shape) in delta.vocab.items()},
        "base_fingerprint": delta.base_fingerprint,
        "stats": delta.stats,
        "checksums": {n: tensor_sha256(t) for n, t in tensors.items()},
    }
    return tensors, meta


def nonfinite_problem(delta: DeltaFile) -> str | None:
    """The first stored tensor of DELTA holding NaN/Inf ('dense tensor X', 'matrix Y block 0 …'), or None.

    Matrices still packed from a resume part (PackedLinear) are skipped: they were checked when
    compressed, before their part was written, and the part's checksums are verified at reuse."""
    for name, t in delta.dense.items():
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            return f"dense tensor {name!r} holds NaN/Inf"
    for name, (_, values, _) in delta.rows.items():
        if values.is_floating_point() and values.numel() and not bool(torch.isfinite(values).all()):
            return f"rows of {name!r} hold NaN/Inf"
    for name, m in delta.matrices.items():
        if isinstance(m, CompressedLinear):
            bad = m.nonfinite_field()
            if bad is not None:
                return f"matrix {name!r}: {bad} holds NaN/Inf"
    for name, (_, m, _) in delta.vocab.items():
        bad = m.nonfinite_field()
        if bad is not None:
            return f"compressed rows of {name!r}: {bad} hold NaN/Inf"
    return None


def save_delta(delta: DeltaFile, path: str | os.PathLike) -> int:
    """Write atomically (temp file in the same directory + rename). Returns the file size in bytes.

    Refuses (DeltaFormatError) a delta with a NaN/Inf in any stored tensor: a reader refuses it too."""
    path = Path(path)
    bad = nonfinite_problem(delta)
    if bad is not None:
        raise DeltaFormatError(f"{path}: not written: {bad}")
    tensors, meta = _to_tensors(delta)
    meta[METADATA_SHA256_FIELD] = metadata_digest(meta)
    raw = json.dumps(meta, sort_keys=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={METADATA_KEY: raw})  # one key: safetensors orders keys at random
        apply_umask(tmp)  # mkstemp made 0600; the delta gets the mode open() would give
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path.stat().st_size


def load_delta(path: str | os.PathLike, verify: bool = True) -> DeltaFile:
    """Read and validate a delta file: metadata (types, names), checksums, blob structure, shapes, dtypes,
    finiteness. Raises DeltaFormatError naming the file; the base-dependent checks are in check_base."""
    path = Path(path)
    meta = read_metadata(path)
    checksums: dict = meta["checksums"]
    tensors: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            if keys != set(checksums):
                raise DeltaFormatError(f"{path}: tensor list does not match its metadata")
            for k in sorted(keys):  # names first: nothing is read for a file naming a forbidden path
                problem = tensor_key_problem(k, meta)
                if problem:
                    raise DeltaFormatError(f"{path}: {problem}")
            for k in sorted(keys):
                t = f.get_tensor(k)
                if verify and tensor_sha256(t) != checksums[k]:
                    raise DeltaFormatError(f"{path}: checksum mismatch in tensor '{k}' (corrupted file)")
                tensors[k] = t
    except (SafetensorError, OSError, RuntimeError) as e:
        raise DeltaFormatError(f"{path}: cannot read tensors (truncated or corrupted?): {e}") from None

    delta = DeltaFile(meta["method"], float(meta["ratio"]), meta["params"],
                      base_fingerprint=meta["base_fingerprint"], stats=meta.get("stats", {}))
    for name, shape in meta["matrices"].items():
        blob = tensors.get(f"linear/{name}")
        if blob is None or blob.dtype != torch.uint8 or blob.ndim != 1:
            raise DeltaFormatError(f"{path}: matrix '{name}' is missing or malformed")
        try:
            delta.matrices[name] = CompressedLinear.from_blob(blob, (shape[0], shape[1]), delta.method)
        except ValueError as e:
            raise DeltaFormatError(f"{path}: matrix '{name}' is corrupted: {e}") from None
    for name, shape in meta["rows"].items():
        idx, values = tensors.get(f"rows/{name}/index"), tensors.get(f"rows/{name}/values")
        if idx is None or values is None or idx.dtype != torch.int64 or idx.ndim != 1 \
                or not values.is_floating_point() or values.ndim != 2 or idx.numel() != values.shape[0] \
                or values.shape[1] != shape[1] or (idx.numel() and (idx.min() < 0 or idx.max() >= shape[0])):
            raise DeltaFormatError(f"{path}: row delta '{name}' is malformed")
        delta.rows[name] = (idx, values, list(shape))
    for name, shape in meta.get("vocab", {}).items():
        rows, blob = tensors.get(f"vocab/{name}/rows"), tensors.get(f"vocab/{name}/delta")
        try:
            n_rows, d, n = (int(v) for v in shape)
            if rows is None or blob is None or rows.dtype != torch.uint8 or blob.dtype != torch.uint8 \
                    or rows.ndim != 1 or blob.ndim != 1:
                raise ValueError("its tensors are missing")
            idx = decode_row_set(rows, n_rows)
            if idx.numel() != n:
                raise ValueError(f"{idx.numel()} rows in its row set, {n} in the metadata")
            m = CompressedLinear.from_blob(blob, (n, d), delta.method)
        except (ValueError, TypeError) as e:
            raise DeltaFormatError(f"{path}: compressed rows of '{name}' are malformed: {e}") from None
        delta.vocab[name] = (idx, m, [n_rows, d])
    for k, t in tensors.items():
        if k.startswith("dense/"):
            delta.dense[k[len("dense/"):]] = t
        elif k.startswith("aux/"):
            if t.dtype != torch.uint8 or t.ndim != 1:
                raise DeltaFormatError(f"{path}: file '{k}' is not stored as bytes")
            delta.aux_files[k[len("aux/"):]] = t.numpy().tobytes()
    bad = nonfinite_problem(delta)
    if bad is not None:
        raise DeltaFormatError(f"{path}: {bad}")
    return delta
