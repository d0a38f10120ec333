"""A delta file's header, without its tensors and without torch: the validated metadata, the blobs'
lengths, and `prinmix info`'s description of the file built from them (docs/format.md).

`prinmix info` reads only this (no torch import, no checksumming of gigabytes): since format 1 files
written by this version record each matrix's {width: ranks} in `stats.rank_widths`. For older files
(no such entry) `header_info` returns None and the caller loads the file (format/delta_info.py).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from safetensors import SafetensorError, safe_open

from ..algorithms.ratio import storage_ratio
from ..errors import DeltaFormatError

__all__ = ["FORMAT_VERSION", "METADATA_KEY", "DeltaInfo", "MatrixInfo", "header_info", "matrix_header_bytes",
           "read_metadata", "rerun_settings"]

FORMAT_VERSION = 1
METADATA_KEY = "prinmix"
# The largest {width: ranks} entry a matrix can have: every width 0..8 and 16, each with a 10-digit count
RANK_WIDTHS_BOUND = {str(b): 4294967295 for b in (*range(9), 16)}


@dataclass(frozen=True)
class MatrixInfo:
    """One compressed linear: shape [h_out, h_in], stored bytes, kept rank, {width: ranks} (widest first)."""

    shape: list[int]
    bytes: int
    rank: int
    widths: dict[str, int]
    ratio: float


@dataclass(frozen=True)
class DeltaInfo:
    """Everything `prinmix info` shows. to_dict() is the `--json` output.

    settings: what the delta was made with, enough to rerun it (method, ratio, calibration source,
    nsamples, seqlen, seed, candidate widths and f_max, distillation steps, the prinmix version).
    """

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
    settings: dict

    def to_dict(self) -> dict:
        return asdict(self)


def rerun_settings(method: str, ratio: float, params: dict) -> dict:
    """The settings of a delta's compress run, from its metadata (None where an older file lacks one)."""
    config = params.get("config") or {}
    return {"method": method, "ratio": ratio, "calib": params.get("calib") or "builtin",
            "nsamples": params.get("nsamples"), "seqlen": params.get("seqlen"), "seed": params.get("seed"),
            "widths": config.get("widths"), "fmax": config.get("fmax"),
            "distill_steps": params.get("distill_steps", 0), "prinmix_version": params.get("prinmix_version")}


def matrix_header_bytes(name: str, shape) -> int:
    """Upper bound (bytes) of what linear delta NAME of `shape` adds to the file's header.

    Its safetensors entry (dtype, shape, offsets: 20 digits allowed per number) and its entries in the
    metadata JSON (sha256 in "checksums", shape in "matrices", objective and {width: ranks} in "stats"), measured on their
    serialised, string-escaped form plus the separators between entries. compress() takes this from the
    matrix's bit budget, so the linear deltas' bytes *on disk* (blobs + their header entries) meet α.
    """
    key = f"linear/{name}"
    big = 10 ** 20 - 1
    entry = json.dumps({key: {"dtype": "U8", "shape": [big], "data_offsets": [big, big]}}, separators=(",", ":"))
    meta = json.dumps({"checksums": {key: "0" * 64}, "matrices": {name: [int(v) for v in shape]},
                       "stats": {"objective": {name: -1.2345678901234567e-300},
                                 "rank_widths": {name: RANK_WIDTHS_BOUND}}}, sort_keys=True)
    skeleton = json.dumps({"checksums": {}, "matrices": {}, "stats": {"objective": {}, "rank_widths": {}}},
                          sort_keys=True)
    return (len(entry) - 2 + 1) + (len(json.dumps(meta)) - len(json.dumps(skeleton))) + 3 * 2


def read_metadata(path: str | os.PathLike) -> dict:
    """The JSON metadata of a delta file, validated; raises DeltaFormatError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise DeltaFormatError(f"{path}: no such delta file")
    try:
        with safe_open(str(path), framework="numpy") as f:  # header only: no torch
            raw = (f.metadata() or {}).get(METADATA_KEY)
    except (SafetensorError, OSError, ValueError) as e:
        raise DeltaFormatError(f"{path}: not a readable delta file (truncated or corrupted?): {e}") from None
    if raw is None:
        raise DeltaFormatError(f"{path}: a safetensors file, but not a prinmix delta (no '{METADATA_KEY}' metadata)")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise DeltaFormatError(f"{path}: corrupted metadata: {e}") from None
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise DeltaFormatError(f"{path}: format version {version!r} is not supported (this prinmix reads {FORMAT_VERSION})")
    for key in ("method", "ratio", "params", "matrices", "rows", "base_fingerprint", "checksums"):
        if key not in meta:
            raise DeltaFormatError(f"{path}: metadata lacks '{key}'")
    return meta


def header_info(path: str | os.PathLike) -> DeltaInfo | None:
    """DeltaInfo from the header alone, or None for a file that does not record its rank widths."""
    path = Path(path)
    meta = read_metadata(path)
    widths = (meta.get("stats") or {}).get("rank_widths")
    if not isinstance(widths, dict) or set(widths) != set(meta["matrices"]):
        return None
    try:
        with safe_open(str(path), framework="numpy") as f:
            sizes = {name: _nbytes(f.get_slice(name)) for name in f.keys()}  # linear blobs: uint8 [bytes]
    except SafetensorError as e:
        raise DeltaFormatError(f"{path}: unreadable tensor header ({e})") from None
    matrices = {}
    for name, shape in meta["matrices"].items():
        nbytes = sizes.get(f"linear/{name}")
        if nbytes is None:
            raise DeltaFormatError(f"{path}: the linear delta {name!r} listed in the metadata is missing")
        counts = {str(k): int(v) for k, v in sorted(widths[name].items(), key=lambda kv: -int(kv[0]))}
        matrices[name] = MatrixInfo([int(v) for v in shape], nbytes, sum(counts.values()), counts,
                                    storage_ratio(nbytes, int(shape[0]) * int(shape[1])))
    linear = sum(m.bytes for m in matrices.values())
    header = sum(matrix_header_bytes(n, s) for n, s in meta["matrices"].items())
    params = sum(m.shape[0] * m.shape[1] for m in matrices.values())
    other = sum(v for k, v in sizes.items() if k.startswith(("dense/", "rows/")))
    aux = sum(v for k, v in sizes.items() if k.startswith("aux/"))
    adapter_bytes = meta["params"].get("lora_adapter_bytes")
    return DeltaInfo(path=str(path), method=meta["method"], ratio_requested=float(meta["ratio"]),
                     lora_adapter_bytes=adapter_bytes, ratio_vs_adapter=linear / adapter_bytes if adapter_bytes else None,
                     ratio_achieved=storage_ratio(linear, params), linear_header_bytes=header,
                     ratio_on_disk=storage_ratio(linear + header, params), file_bytes=path.stat().st_size,
                     linear_bytes=linear, other_bytes=other, aux_bytes=aux, dense_delta_params=params,
                     base=meta["base_fingerprint"], matrices=matrices,
                     other_tensors=sorted(k[len("dense/"):] for k in sizes if k.startswith("dense/"))
                     + sorted(meta["rows"]), settings=rerun_settings(meta["method"], float(meta["ratio"]), meta["params"]))


def _nbytes(tensor_slice) -> int:
    """Bytes of a tensor from its header entry (dtype and shape)."""
    n = 1
    for d in tensor_slice.get_shape():
        n *= int(d)
    return n * _DTYPE_BYTES.get(tensor_slice.get_dtype(), 1)


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
