"""What a delta file holds, for `prinmix info` and the evaluation tables: method, ratios, true bytes,
base fingerprint and the per-matrix bit allocation.

`describe_delta` reads and verifies the whole file (the per-rank widths are inside the blobs);
`delta_sizes` reads the header only (method, ratios and byte counts, without checksumming gigabytes).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

from safetensors import SafetensorError, safe_open

from ..algorithms.budget import storage_ratio
from ..errors import DeltaFormatError
from .delta_file import load_delta, matrix_header_bytes, read_metadata

__all__ = ["DeltaInfo", "DeltaSizes", "MatrixInfo", "delta_sizes", "describe_delta", "rerun_settings"]


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


def describe_delta(path: str | os.PathLike) -> DeltaInfo:
    """Method, ratio, true bytes, base fingerprint and per-matrix bit allocation of a delta file (verified)."""
    path = Path(path)
    delta = load_delta(path)
    per_matrix = {}
    for name, m in delta.matrices.items():
        counts: dict[int, int] = {}
        for w in m.rank_widths():
            counts[w] = counts.get(w, 0) + 1
        per_matrix[name] = MatrixInfo(list(m.shape), m.nbytes(), m.rank,
                                      {str(k): v for k, v in sorted(counts.items(), reverse=True)},
                                      storage_ratio(m.nbytes(), m.shape[0] * m.shape[1]))
    params = delta.dense_delta_params()
    linear, header = delta.linear_bytes(), delta.linear_header_bytes()
    adapter_bytes = delta.params.get("lora_adapter_bytes")  # set when FINETUNED was a LoRA adapter
    weights, whole_params = delta.weight_bytes(), delta.whole_delta_params()
    return DeltaInfo(path=str(path), method=delta.method, ratio_requested=delta.ratio,
                     lora_adapter_bytes=adapter_bytes,
                     ratio_vs_adapter=linear / adapter_bytes if adapter_bytes else None,
                     ratio_achieved=storage_ratio(linear, params), linear_header_bytes=header,
                     ratio_on_disk=storage_ratio(linear + header, params), file_bytes=path.stat().st_size,
                     linear_bytes=linear, other_bytes=delta.dense_bytes(), aux_bytes=delta.aux_bytes(),
                     dense_delta_params=params, base=delta.base_fingerprint, matrices=per_matrix,
                     other_tensors=sorted(delta.dense) + sorted(delta.rows),
                     settings=rerun_settings(delta.method, delta.ratio, delta.params),
                     whole_mode=bool(delta.params.get("whole", False)),
                     ratio_whole=weights["total"] / (2 * whole_params) if whole_params else 0.0,
                     whole_params=whole_params, weight_bytes=weights,
                     vocab={n: {"shape": shape, "rows": int(idx.numel()), "rank": m.rank,
                                "bytes": weights["vocab"][n]} for n, (idx, m, shape) in delta.vocab.items()})


def delta_sizes(path: str | os.PathLike) -> DeltaSizes:
    """Method, ratios and linear byte counts of a delta file from its header alone (validated metadata;
    the blobs' sizes are their lengths in the safetensors header; no tensor data is read)."""
    meta = read_metadata(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            linear = sum(f.get_slice(f"linear/{name}").get_shape()[0] for name in meta["matrices"])
    except SafetensorError as e:
        raise DeltaFormatError(f"{path}: a linear delta listed in the metadata is missing ({e})") from None
    shapes = meta["matrices"]
    return DeltaSizes(str(path), meta["method"], float(meta["ratio"]), linear,
                      sum(matrix_header_bytes(n, s) for n, s in shapes.items()),
                      sum(int(s[0]) * int(s[1]) for s in shapes.values()))
