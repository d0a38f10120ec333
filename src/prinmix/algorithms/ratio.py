"""The compression ratio of stored bytes against the 16-bit delta they stand for (no torch: `prinmix info`
reads a delta's header without loading tensors, and reports this ratio)."""

from __future__ import annotations

__all__ = ["storage_ratio"]


def storage_ratio(nbytes: int, dense_params: int) -> float:
    """The compression ratio of `nbytes` stored bytes standing for `dense_params` 16-bit delta entries:
    8·bytes / (16·params) (0.0 when there is nothing to compare with). The one place of this formula."""
    return 8 * nbytes / (16 * dense_params) if dense_params else 0.0
