"""Plain-text tables of the evaluation results: number formatting and aligned grids."""

from __future__ import annotations

__all__ = ["format_grid", "format_number"]


def format_number(v) -> str:
    """3 significant digits; scientific notation outside [1e-3, 1e4); "-" for None."""
    if v is None:
        return "-"
    return f"{v:.3g}" if 1e-3 <= abs(v) < 1e4 or v == 0 else f"{v:.2e}"


def format_grid(rows: list[list[str]], n_head: int = 1) -> str:
    """Rows of cells as aligned text (first column left, others right), a rule under the n_head header rows."""
    widths = [max(len(r[j]) for r in rows) for j in range(len(rows[0]))]
    lines = []
    for k, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths))))
        if k == n_head - 1:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
