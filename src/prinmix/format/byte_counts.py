"""What a delta file stores, counted: upper bounds of the header bytes each stored tensor costs (its
safetensors entry and its entries in the "prinmix" metadata JSON), the weight bytes by part and the number
of entries the whole-delta ratio is of. Plain Python on sizes (no torch), shared by the compressor's
budgets, DeltaFile's counts of a delta in memory and `prinmix info`'s counts from a file's header.
"""

from __future__ import annotations

import json

__all__ = ["entries_header_bytes", "matrix_header_bytes", "dense_header_bytes", "rows_header_bytes",
           "vocab_header_bytes", "weight_bytes_by_part", "whole_delta_entries"]


def entries_header_bytes(tensors: dict[str, int], meta: dict, skeleton: dict) -> int:
    """Upper bound (bytes) of the header entries of some tensors: their safetensors entries ({key: ndim},
    dtype, shape and offsets with 20 digits allowed per number) plus `meta`, their part of the metadata
    JSON (sha256 in "checksums" added here), measured on the serialised, string-escaped form against
    `skeleton` (the same keys, empty), with the separators between entries."""
    big = 10 ** 20 - 1
    n = 0
    for key, ndim in tensors.items():
        entry = json.dumps({key: {"dtype": "U8", "shape": [big] * max(ndim, 1), "data_offsets": [big, big]}},
                           separators=(",", ":"))
        n += len(entry) - 2 + 1
    meta = {**meta, "checksums": {k: "0" * 64 for k in tensors}}
    skeleton = {**skeleton, "checksums": {}}
    full, empty = json.dumps(meta, sort_keys=True), json.dumps(skeleton, sort_keys=True)
    return n + (len(json.dumps(full)) - len(json.dumps(empty))) + 3 * 2 * (len(tensors) + len(meta) - 1)


def matrix_header_bytes(name: str, shape) -> int:
    """Upper bound (bytes) of what linear delta NAME of `shape` adds to the file's header.

    Its safetensors entry and its entries in the metadata JSON (sha256 in "checksums", shape in
    "matrices", objective in "stats"; see entries_header_bytes). compress() takes this from the
    matrix's bit budget, so the linear deltas' bytes *on disk* (blobs + their header entries) meet α.
    """
    return entries_header_bytes({f"linear/{name}": 1},
                                {"matrices": {name: [int(v) for v in shape]},
                                 "stats": {"objective": {name: -1.2345678901234567e-300}}},
                                {"matrices": {}, "stats": {"objective": {}}})


def dense_header_bytes(name: str, ndim: int) -> int:
    """Upper bound of the header entries of an exactly stored tensor dense/NAME."""
    return entries_header_bytes({f"dense/{name}": ndim}, {}, {})


def rows_header_bytes(name: str) -> int:
    """Upper bound of the header entries of exactly stored rows of NAME (index, values, shape)."""
    big = 10 ** 20 - 1
    return entries_header_bytes({f"rows/{name}/index": 1, f"rows/{name}/values": 2},
                                {"rows": {name: [big, big]}}, {"rows": {}})


def vocab_header_bytes(name: str) -> int:
    """Upper bound of the header entries of the compressed rows of NAME (row set, blob, shape)."""
    big = 10 ** 20 - 1
    return entries_header_bytes({f"vocab/{name}/rows": 1, f"vocab/{name}/delta": 1},
                                {"vocab": {name: [big, big, big]}}, {"vocab": {}})


def weight_bytes_by_part(matrices: dict[str, tuple[int, list[int]]], vocab: dict[str, int],
                         dense: dict[str, tuple[int, int]], rows: dict[str, int]) -> dict:
    """Bytes stored for weights, by part, each with its header entries (upper bounds above):
    {"linear", "vocab": {name: bytes}, "exact", "total"}.

    Args: matrices {name: (blob bytes, [h_out, h_in])}; vocab {name: row-set blob + delta blob bytes};
    dense {name: (bytes, ndim)}; rows {name: index + values bytes}. Config/tokenizer files (aux/) and the
    file-level metadata (params, fingerprint) are not weights."""
    linear = sum(n + matrix_header_bytes(name, shape) for name, (n, shape) in matrices.items())
    by_vocab = {name: n + vocab_header_bytes(name) for name, n in vocab.items()}
    exact = sum(n + dense_header_bytes(name, ndim) for name, (n, ndim) in dense.items())
    exact += sum(n + rows_header_bytes(name) for name, n in rows.items())
    return {"linear": linear, "vocab": by_vocab, "exact": exact, "total": linear + sum(by_vocab.values()) + exact}


def whole_delta_entries(matrix_shapes, dense_numels, row_shapes, vocab_shapes) -> int:
    """Entries of what differs from the base, whose 16-bit size the whole-delta ratio is of: whole matrices
    of the linears ([h_out, h_in] each), whole other tensors (numel each), the changed / new rows of an
    embedding or lm_head stored exactly or compressed ([rows, d] each)."""
    return sum(int(a) * int(b) for a, b in [*matrix_shapes, *row_shapes, *vocab_shapes]) + sum(dense_numels)
