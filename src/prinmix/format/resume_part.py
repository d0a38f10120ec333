"""Integrity of compress's resume parts (one safetensors file per finished layer, see prinmix.api.compress).

A part is reused by a later run with the same resume key, so a part damaged in between (a truncated
write after a crash of the machine, a flipped bit, a stray edit) would be folded into a delta that
passes every checksum of the final file. Each part therefore records the sha256 of every tensor and
of its other metadata entries (shapes, method, objective) in its metadata ("checksums", JSON
{tensor key or "metadata": hex digest}); `part_problem` verifies them before reuse, and compress
recomputes the layer of a part that fails.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .delta_file import tensor_sha256

CHECKSUMS_KEY = "checksums"

__all__ = ["CHECKSUMS_KEY", "part_checksums", "part_problem"]


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
