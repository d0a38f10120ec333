"""Hessians H = Σ x xᵀ of every linear of a decoder layer over the calibration set (GPTQ's statistic).

`capture_hessians(layer, inputs)` runs the layer over the calibration hidden states with forward hooks
on its nn.Linear modules; linears fed the very same tensor (q/k/v, gate/up) share one accumulation.
Fused mixture-of-experts parameters get per-expert Hessians (expert_hessians.py).
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .expert_hessians import ExpertCapture
from .layer_inputs import LayerInputs, forward_batches

__all__ = ["HessianStat", "capture_hessians", "unique_hessians"]


@dataclass
class HessianStat:
    """Input second-moment sum of one or more nn.Linear modules that receive the same input tensor.

    H: float32 [in, in] = Σ_tokens x xᵀ (unnormalised), on the layer's device.
    n_tokens: number of token rows accumulated. names: the linear names (relative to the layer)
    sharing this accumulation, in call order (e.g. q_proj, k_proj, v_proj).
    """

    H: torch.Tensor
    n_tokens: int
    names: list[str]


class _HessianRecorder:
    """Forward hooks accumulating HessianStat per distinct linear input (shared inputs detected by identity)."""

    def __init__(self, layer: nn.Module) -> None:
        self.linears = {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}
        self.stats: dict[str, HessianStat] = {}
        self.first_pass = True
        self.pass_inputs: list[tuple[weakref.ref, HessianStat]] = []

    def hook(self, name: str):
        def on_forward(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            x = args[0] if args else kwargs["input"]
            for reference, stat in self.pass_inputs:
                if reference() is x:
                    if name in stat.names:
                        if stat.names[0] == name:  # the same module called twice on one tensor
                            self._accumulate(stat, x)
                        return
                    if not self.first_pass:
                        raise RuntimeError(f"linear {name} now shares its input with {stat.names}; it did not before")
                    stat.names.append(name)
                    self.stats[name] = stat
                    return
            stat = self.stats.get(name)
            if stat is None:
                if not self.first_pass:
                    raise RuntimeError(f"linear {name} was not called in the first mini-batch")
                stat = HessianStat(
                    H=torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float32, device=module.weight.device),
                    n_tokens=0,
                    names=[name],
                )
                self.stats[name] = stat
            elif stat.names[0] != name:
                raise RuntimeError(f"linear {name} no longer receives the same input as {stat.names[0]}")
            self.pass_inputs.append((weakref.ref(x), stat))
            self._accumulate(stat, x)

        return on_forward

    def start_batch(self, start: int) -> None:
        self.first_pass = start == 0
        self.pass_inputs = []

    @staticmethod
    def _accumulate(stat: HessianStat, x: torch.Tensor) -> None:
        rows = x.detach().reshape(-1, x.shape[-1]).to(device=stat.H.device, dtype=torch.float32)
        stat.H.addmm_(rows.T, rows)
        stat.n_tokens += rows.shape[0]


def capture_hessians(
    layer: nn.Module,
    inputs: LayerInputs,
    batch_size: int = 8,
    return_outputs: bool = False,
    layer_index: int | None = None,
) -> dict[str, HessianStat] | tuple[dict[str, HessianStat], torch.Tensor]:
    """{linear name: HessianStat} of every nn.Linear in `layer` over the calibration set.

    Linears fed the very same tensor (q/k/v, gate/up) map to one shared HessianStat, accumulated
    once. With return_outputs=True, also returns the layer outputs [n, seq, d] float32 (on
    inputs.device) of the same forward pass, as (stats, outputs).
    """
    recorder = _HessianRecorder(layer)
    handles = [
        module.register_forward_hook(recorder.hook(name), with_kwargs=True) for name, module in recorder.linears.items()
    ]
    layout = getattr(layer, "prinmix_layout", None)
    experts = ExpertCapture(layer, layout.expert_parameters, HessianStat) if layout and layout.expert_parameters else None
    outputs = torch.empty(inputs.hidden.shape, dtype=torch.float32, device=inputs.device) if return_outputs else None
    try:
        with torch.no_grad(), experts or contextlib.nullcontext():
            for start, output in forward_batches(layer, inputs, batch_size, layer_index, recorder.start_batch):
                if outputs is not None:
                    outputs[start : start + output.shape[0]] = output.to(inputs.device)
                if experts is not None:
                    experts.end_batch()
    finally:
        for handle in handles:
            handle.remove()
    stats = {name: recorder.stats[name] for name in recorder.linears if name in recorder.stats}
    if layout is not None:  # keyed by checkpoint matrix name; per-expert Hessians of fused experts
        stats = layout.checkpoint_stats(stats, experts.close() if experts is not None else {})
    return (stats, outputs) if return_outputs else stats


def unique_hessians(stats: dict[str, HessianStat]) -> list[HessianStat]:
    """The distinct HessianStat objects of a capture_hessians result, in first-name order."""
    seen: dict[int, HessianStat] = {}
    for stat in stats.values():
        seen.setdefault(id(stat), stat)
    return list(seen.values())
