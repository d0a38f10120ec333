"""The registry of compression methods: every place that lists, validates or branches on a method name
reads it from here (the CLI's `--method` choices, the compressor, the demo, the benchmarks).

No torch import: the CLI builds its parser from this module without loading torch.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Method", "METHODS", "METHOD_NAMES", "CALIBRATED", "method"]


@dataclass(frozen=True)
class Method:
    """One compressor of a matrix delta ΔW [h_out, h_in].

    calibrated: needs the layer-input Hessians H = XXᵀ (a calibration pass over the model).
    min_ratio: the smallest ratio α it can store (BitDelta: 1 bit per entry, α = 1/16), or None.
    summary: one line for help texts.
    """

    name: str
    calibrated: bool
    min_ratio: float | None
    summary: str


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("prinmix", True, None, "SVD, per-rank widths by Eq. 8, V by GPTQ, U corrected by RTC (Eq. 7)"),
    Method("deltacome", True, None, "SVD, fixed 8/3/2-bit rank groups, V by GPTQ (the DeltaCoMe baseline)"),
    Method("lowrank", False, None, "truncated SVD in 16-bit floats"),
    Method("bitdelta", False, 1 / 16, "sign of ΔW with one scale per matrix (1 bit per entry)"),
)}
METHOD_NAMES: tuple[str, ...] = tuple(METHODS)
CALIBRATED: tuple[str, ...] = tuple(n for n, m in METHODS.items() if m.calibrated)


def method(name: str) -> Method:
    """The registry entry of `name`; ValueError naming the choices otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}: choose one of {', '.join(METHOD_NAMES)}") from None
