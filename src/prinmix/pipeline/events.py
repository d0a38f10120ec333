"""What the sequential compressor reports while it runs, and the listeners that subscribe to it.

A listener is any callable taking one event; the compressor calls every listener with every event, in
order, from the thread that runs it. Listeners pick the event types they care about (progress bars:
LayerDone; `on_hessians`: HessiansCaptured; benchmarks/bench_memory.py: PhaseStarted/PhaseDone).
The events carry references, not copies: a listener must not modify what it is given.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

import torch

__all__ = ["CompressEvent", "HessiansCaptured", "LayerDone", "LayerStarted", "Listener", "Phase", "PhaseDone",
           "PhaseStarted", "hessian_listener", "progress_listener"]


class Phase(str, Enum):
    """The timed steps of a compress run."""

    EMBED = "embed"          # the calibration windows through the layers before layer 0
    CAPTURE = "capture"      # one layer's forward over the calibration set with Hessian hooks
    COMPRESS = "compress"    # one matrix through compress_matrix
    PROPAGATE = "propagate"  # the calibration hidden states through base + compressed delta of one layer


@dataclass(frozen=True)
class LayerStarted:
    layer: int
    total: int


@dataclass(frozen=True)
class HessiansCaptured:
    """H = XXᵀ (float32 [h_in, h_in], unnormalised) of each linear weight of `layer`, by weight name."""

    layer: int
    hessians: dict[str, torch.Tensor]


@dataclass(frozen=True)
class LayerDone:
    """Layer `layer` (0-based) of `total` is compressed (resumed: read from an earlier run's part)."""

    layer: int
    total: int
    resumed: bool = False


@dataclass(frozen=True)
class PhaseStarted:
    phase: Phase
    layer: int | None = None
    detail: dict = field(default_factory=dict)  # e.g. {"matrix": name, "shape": [h_out, h_in]}


@dataclass(frozen=True)
class PhaseDone:
    phase: Phase
    layer: int | None = None
    detail: dict = field(default_factory=dict)


CompressEvent = LayerStarted | HessiansCaptured | LayerDone | PhaseStarted | PhaseDone
Listener = Callable[[CompressEvent], None]


def progress_listener(progress: Callable[[int, int, str], None]) -> Listener:
    """A listener calling progress(done_layers, total_layers, "layer i") after each layer."""
    def on_event(event: CompressEvent) -> None:
        if isinstance(event, LayerDone):
            progress(event.layer + 1, event.total, f"layer {event.layer}")
    return on_event


def hessian_listener(on_hessians: Callable[[int, dict[str, torch.Tensor]], None]) -> Listener:
    """A listener calling on_hessians(layer_index, {weight name: H}) for each calibrated layer."""
    def on_event(event: CompressEvent) -> None:
        if isinstance(event, HessiansCaptured):
            on_hessians(event.layer, event.hessians)
    return on_event
