"""PrinMix's knobs: candidate widths, f_max, RTC and GPTQ settings (the only place of widths and f_max)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DEFAULT_WIDTHS", "PrinMixConfig"]

DEFAULT_WIDTHS = (0, 2, 3, 4, 5, 6, 7, 8)


@dataclass
class PrinMixConfig:
    """Knobs of PrinMix. Defaults follow the paper (widths {0,2..8}, f_max = 4, RTC on)."""

    widths: tuple[int, ...] = DEFAULT_WIDTHS   # candidate widths Q (0 = rank dropped)
    fmax: int = 4                              # at most this many distinct widths (0 counts, as in Eq. 8)
    v_group: int | None = None                 # V scale group (input columns); None = one per row
    rtc: bool = True                           # Reconstruction Target Correction (Eq. 7)
    rtc_damp: float = 1e-4
    percdamp: float = 0.01                     # GPTQ damping, fraction of mean diag(H)
    clip_search: bool = False                  # min–max range shrink search in the quantiser
    blocksize: int = 128                       # GPTQ lazy-batch block

    def validate(self) -> None:
        if not self.widths or any(not (0 <= b <= 8) for b in self.widths):
            raise ValueError(f"candidate widths must lie in 0..8, got {self.widths}")
        if len(set(self.widths)) != len(self.widths):
            raise ValueError(f"candidate widths repeat: {self.widths}")
        if self.fmax < 1:
            raise ValueError(f"fmax must be ≥ 1, got {self.fmax}")
