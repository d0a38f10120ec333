"""Integrity of compress's resume parts (one safetensors file per finished layer, see prinmix.api.compress).

A part is reused by a later run with the same resume key, so a part damaged in between (a truncated
write after a crash of the machine, a flipped bit, a stray edit) would be folded into a delta that
passes every checksum of the final file. Each part therefore records the sha256 of every tensor in
its metadata ("checksums", JSON {tensor key: hex digest}); `part_problem` verifies them before reuse,
and compress recomputes the layer of a part that fails.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .delta_file import tensor_sha256

CHECKSUMS_KEY = "checksums"

__all__ = ["CHECKSUMS_KEY", "part_checksums", "part_problem"]


def part_checksums(tensors: dict[str, torch.Tensor]) -> str:
    """The metadata value recording each tensor's sha256 (JSON {key: hex digest})."""
    return json.dumps({k: tensor_sha256(t) for k, t in sorted(tensors.items())}, sort_keys=True)


def part_problem(path: Path) -> str | None:
    """Why the resume part at PATH cannot be reused (unreadable, truncated, no or wrong checksums), or None."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            want = json.loads(meta.get(CHECKSUMS_KEY, "null"))
            if not isinstance(want, dict) or set(want) != set(f.keys()):
                return "has no checksums for its tensors (written by an older prinmix?)"
            for key in sorted(want):
                if tensor_sha256(f.get_tensor(key)) != want[key]:
                    return f"checksum mismatch in {key!r}"
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        return f"unreadable ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    return None
