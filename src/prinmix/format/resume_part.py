"""Resume parts of an interrupted compress: one safetensors file per finished decoder layer.

A part holds the layer's compressed linears as their stored blobs (`linear/<weight name>`: uint8
[nbytes]) and the tensors kept exactly (`dense/<name>`), with metadata {"method", "shapes": {name:
[h_out, h_in]}, "objective": {name: Eq. 8 objective or null}, "checksums"} (JSON strings).
`write_layer_part` writes it atomically (temporary file + rename); `read_layer_part` parses the
metadata once and hands the linears out as `MappedCompressedLinear` over memory-mapped blobs.

Integrity: a part is reused by a later run with the same resume key, so a part damaged in between (a
truncated write after a crash of the machine, a flipped bit, a stray edit) would be folded into a delta
that passes every checksum of the final file. Each part therefore records the sha256 of every tensor
and of its other metadata entries in "checksums" (JSON {tensor key or "metadata": hex digest});
`part_problem` verifies them before reuse, and compress recomputes the layer of a part that fails.
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

from ..algorithms.compressed_linear import CompressedLinear
from .delta_file import tensor_sha256

CHECKSUMS_KEY = "checksums"

__all__ = ["CHECKSUMS_KEY", "LayerPart", "MappedCompressedLinear", "part_checksums", "part_problem", "read_layer_part",
           "write_layer_part"]


METADATA_DIGEST = "metadata"  # the checksums' entry for the part's other metadata entries


def _metadata_sha256(meta: dict[str, str]) -> str:
    rest = {k: v for k, v in meta.items() if k != CHECKSUMS_KEY}
    return hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()


def part_checksums(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> str:
    """The metadata value recording each tensor's sha256 and that of META's other entries (JSON)."""
    digests = {k: tensor_sha256(t) for k, t in sorted(tensors.items())}
    digests[METADATA_DIGEST] = _metadata_sha256(meta)
    return json.dumps(digests, sort_keys=True)


def part_problem(path: Path) -> str | None:
    """Why the resume part at PATH cannot be reused (unreadable, truncated, no or wrong checksums), or None."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            want = json.loads(meta.get(CHECKSUMS_KEY, "null"))
            if not isinstance(want, dict) or set(want) != set(f.keys()) | {METADATA_DIGEST}:
                return "has no checksums for its tensors (written by an older prinmix?)"
            if want.pop(METADATA_DIGEST) != _metadata_sha256(meta):
                return "checksum mismatch in its metadata"
            for key in sorted(want):
                if tensor_sha256(f.get_tensor(key)) != want[key]:
                    return f"checksum mismatch in {key!r}"
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        return f"unreadable ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    return None


class MappedCompressedLinear:
    """A compressed linear kept as its blob between layers (codes bit-packed) instead of unpacked objects.

    CompressedLinear holds one byte per code (one per entry for BitDelta's signs), up to 8× its stored
    size; over 80 layers of a 70B model that is tens of GB. shape, method, info, nbytes() and
    to_blob() come from the blob; any other attribute unpacks it once (and keeps it, so changes to
    it, e.g. distilled BitDelta scales, are what to_blob() then returns). decoded() gives a fresh
    CompressedLinear without keeping it.
    """

    def __init__(self, m) -> None:
        self.shape, self.method, self.info = tuple(m.shape), m.method, m.info
        self._blob, self._nbytes, self._unpacked = m.to_blob(), m.nbytes(), None

    @classmethod
    def from_blob(cls, blob: torch.Tensor, shape, method: str, info: dict | None = None) -> "MappedCompressedLinear":
        """Wrap a stored blob (uint8 [nbytes], e.g. memory-mapped from a file) without decoding it."""
        self = cls.__new__(cls)
        self.shape, self.method, self.info = tuple(int(v) for v in shape), method, dict(info or {})
        self._blob, self._nbytes, self._unpacked = blob, int(blob.numel()), None
        return self

    def nbytes(self) -> int:
        return self._nbytes if self._unpacked is None else self._unpacked.nbytes()

    def to_blob(self) -> torch.Tensor:
        return self._blob if self._unpacked is None else self._unpacked.to_blob()

    def decoded(self) -> CompressedLinear:
        """A new CompressedLinear decoded from the blob (not kept: the caller frees it)."""
        if self._unpacked is not None:
            return self._unpacked
        m = CompressedLinear.from_blob(self._blob, self.shape, self.method)
        m.info = dict(self.info)
        return m

    def unpacked(self) -> CompressedLinear:
        """The CompressedLinear (decoded from the blob on first use, then kept)."""
        if self._unpacked is None:
            self._unpacked = CompressedLinear.from_blob(self._blob, self.shape, self.method)
            self._unpacked.info = self.info
            self._blob = None
        return self._unpacked

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.unpacked(), name)


@dataclass
class LayerPart:
    """One finished layer: compressed linears by weight name, and tensors stored exactly by name."""

    method: str
    matrices: dict[str, MappedCompressedLinear] = field(default_factory=dict)
    dense: dict[str, torch.Tensor] = field(default_factory=dict)


def write_layer_part(method: str, matrices: dict, dense: dict[str, torch.Tensor], path: Path) -> None:
    """Write a layer's compressed linears (anything with to_blob/shape/info) and exact tensors to `path`
    (atomic: a temporary sibling renamed into place)."""
    tensors = {f"linear/{n}": m.to_blob() for n, m in matrices.items()}
    tensors.update({f"dense/{n}": t.contiguous() for n, t in dense.items()})
    meta = {"shapes": json.dumps({n: list(m.shape) for n, m in matrices.items()}), "method": method,
            "objective": json.dumps({n: m.info.get("objective") for n, m in matrices.items()})}
    meta[CHECKSUMS_KEY] = part_checksums(tensors, meta)  # verified before reuse (part_problem)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    save_file(tensors, tmp, metadata=meta)
    os.replace(tmp, path)


def read_layer_part(path: Path) -> LayerPart:
    """The part at `path`: linears as MappedCompressedLinear over memory-mapped blobs (safetensors maps
    the file: its pages are file-backed and reclaimable, so 80 layers of compressed blobs cost no
    anonymous RAM; they stay valid after the part file is deleted), exact tensors loaded."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        shapes, objective = json.loads(meta["shapes"]), json.loads(meta["objective"])
        part = LayerPart(meta["method"])
        for name, shape in shapes.items():
            info = {"objective": objective[name]} if objective.get(name) is not None else {}
            part.matrices[name] = MappedCompressedLinear.from_blob(f.get_tensor(f"linear/{name}"), shape,
                                                                   meta["method"], info)
        for key in f.keys():
            if key.startswith("dense/"):
                part.dense[key[len("dense/"):]] = f.get_tensor(key)
    return part
