"""The honest bit budget of a matrix delta and the true stored cost of a rank.

The ratio α is of the 16-bit delta: budget = α · 16 · h_out · h_in bits, and *everything*
stored for the matrix (codes, scales, zero points, per-rank widths, Σ, block headers) is
counted against it. This differs from the paper's B = (h_in + h_out)·Q, which counts codes only.
"""

from __future__ import annotations

import math
from fractions import Fraction

from .blob_layout import BLOB_HEADER_BYTES, BLOCK_HEADER_BYTES, packed_nbytes  # noqa: F401  (packed_nbytes re-exported)

SCALE_ZERO_BITS = 16 + 8   # float16 scale + uint8 zero point per quantisation group


def parse_ratio(text: str | float) -> float:
    """'1/16', '0.0625' or '16x' → 0.0625. Raises ValueError for anything else or a ratio ∉ (0, 1]."""
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        s = text.strip().lower()
        try:
            if s.endswith("x"):
                value = 1.0 / float(s[:-1])
            else:
                value = float(Fraction(s))
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"invalid ratio {text!r}: use e.g. 1/16, 0.0625 or 16x") from None
    if not (0.0 < value <= 1.0) or math.isnan(value):
        raise ValueError(f"invalid ratio {text!r}: must lie in (0, 1] (1/16 = one bit per delta entry)")
    return value


def storage_ratio(nbytes: int, dense_params: int) -> float:
    """The compression ratio of `nbytes` stored bytes standing for `dense_params` 16-bit delta entries:
    8·bytes / (16·params) (0.0 when there is nothing to compare with). The one place of this formula."""
    return 8 * nbytes / (16 * dense_params) if dense_params else 0.0


def budget_bits(ratio: float, h_out: int, h_in: int) -> int:
    """Bits allowed for one matrix: floor(α · 16 · h_out · h_in)."""
    return int(math.floor(ratio * 16 * h_out * h_in + 1e-9))


def prinmix_rank_cost_bits(bits: int, h_out: int, h_in: int, v_group: int | None = None) -> int:
    """Stored bits of ONE rank at width `bits` in PrinMix's layout (0 for a dropped rank).

    V row: bits·h_in codes + one (scale, zero) per group of `v_group` input columns (None: per row);
    U column (stored transposed, Σ folded into it): bits·h_out codes + one (scale, zero).
    """
    if bits == 0:
        return 0
    v_groups = math.ceil(h_in / (v_group or h_in))
    return bits * (h_in + h_out) + SCALE_ZERO_BITS * (v_groups + 1)


def prinmix_fixed_overhead_bits(max_blocks: int) -> int:
    """Upper bound of the bits a PrinMix blob spends besides per-rank costs:
    blob header + per block (header + ≤ 1 byte of packing padding in each of V's and U's codes)."""
    return 8 * (BLOB_HEADER_BYTES + max_blocks * (BLOCK_HEADER_BYTES + 2))
