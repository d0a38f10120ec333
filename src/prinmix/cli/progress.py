"""Progress bars on stderr (tqdm) for the commands."""

from __future__ import annotations

import sys

from tqdm import tqdm


class LayerProgress:
    """A progress bar with ETA: call it as progress(done, total, message)."""

    def __init__(self, desc: str, unit: str = "layer"):
        self.desc, self.unit, self.bar = desc, unit, None

    def __call__(self, done: int, total: int, message: str) -> None:
        if self.bar is None:
            self.bar = tqdm(total=total, desc=self.desc, unit=self.unit, file=sys.stderr, dynamic_ncols=True)
        self.bar.set_postfix_str(message)
        self.bar.update(done - self.bar.n)
        if done >= total:
            self.bar.close()


def format_bytes(n: int) -> str:
    """1536 → '1.5 KiB' (B, KiB, MiB, GiB)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n} B"
