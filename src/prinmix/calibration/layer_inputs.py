"""The calibration set's inputs of the decoder layers, and running one layer over them.

`LayerInputs` holds the hidden states entering the next layer ([n, seq, d] float32) and the extra
arguments each layer is called with (captured by DecoderStack.embed); `run_layer` replays a layer over
the whole set in mini-batches; `forward_batches` is that replay, shared with Hessian capture.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

__all__ = ["LAYER_INDEX_ATTRIBUTE", "LayerInputs", "PerBatch", "forward_batches", "map_leaves", "run_layer"]

LAYER_INDEX_ATTRIBUTE = "prinmix_layer_index"


# --------------------------------------------------------------------------- captured layer inputs
@dataclass(frozen=True)
class PerBatch:
    """A captured kwarg tensor with a batch dimension, stored for one sequence ([1, ...]); expanded per batch."""

    tensor: torch.Tensor


def map_leaves(value: Any, fn: Callable[[Any], Any], memo: dict[int, Any]) -> Any:
    """Rebuild a nest of tuples/lists/dicts, applying fn to every tensor / PerBatch leaf (shared leaves stay shared)."""
    if isinstance(value, (torch.Tensor, PerBatch)):
        key = id(value)
        if key not in memo:
            memo[key] = fn(value)
        return memo[key]
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(map_leaves(v, fn, memo) for v in value)
    if isinstance(value, list):
        return [map_leaves(v, fn, memo) for v in value]
    if isinstance(value, dict):
        return {k: map_leaves(v, fn, memo) for k, v in value.items()}
    return value


def _move_leaf(leaf: Any, device: torch.device | str | None, dtype: torch.dtype | None) -> Any:
    """Move a tensor / PerBatch leaf to `device`, casting floating tensors to `dtype` (when given)."""
    tensor = leaf.tensor if isinstance(leaf, PerBatch) else leaf
    cast = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
    moved = tensor.to(device=device if device is not None else tensor.device, dtype=cast)
    return PerBatch(moved) if isinstance(leaf, PerBatch) else moved


def _expand_leaf(leaf: Any, batch: int) -> Any:
    if isinstance(leaf, PerBatch):
        return leaf.tensor.expand(batch, *leaf.tensor.shape[1:])
    return leaf


@dataclass
class LayerInputs:
    """What the decoder layers receive for the calibration set.

    hidden: [n, seq, d] float32 hidden states entering the next layer to run.
    layer_args[i] / layer_kwargs[i]: the extra positional args (after the hidden states) and the
    kwargs layer i is called with (use_cache=False, no cache), captured for one sequence; tensors
    with a batch dimension are wrapped in PerBatch and expanded to the mini-batch size when replayed.
    Tensors shared between layers (e.g. position embeddings) are stored once.
    """

    hidden: torch.Tensor
    layer_args: list[tuple] = field(default_factory=list)
    layer_kwargs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def n_sequences(self) -> int:
        return int(self.hidden.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.hidden.shape[1])

    @property
    def device(self) -> torch.device:
        return self.hidden.device

    def with_hidden(self, hidden: torch.Tensor) -> "LayerInputs":
        """Same layer args/kwargs, new hidden states ([n, seq, d]; e.g. the previous layer's outputs)."""
        if hidden.shape[:2] != self.hidden.shape[:2]:
            raise ValueError(f"hidden states of shape {list(hidden.shape)} do not match {list(self.hidden.shape)}")
        return replace(self, hidden=hidden)

    def to(self, device: torch.device | str) -> "LayerInputs":
        """A copy with the hidden states and all captured tensors on `device` (e.g. "cpu" to offload)."""
        memo: dict[int, Any] = {}
        move = lambda leaf: _move_leaf(leaf, device, None)  # noqa: E731
        return LayerInputs(
            hidden=self.hidden.to(device),
            layer_args=map_leaves(self.layer_args, move, memo),
            layer_kwargs=map_leaves(self.layer_kwargs, move, memo),
        )

    def call_arguments(
        self, layer_index: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> tuple[tuple, dict[str, Any]]:
        """(args, kwargs) templates of layer `layer_index` moved to device, floating tensors cast to dtype."""
        if not 0 <= layer_index < len(self.layer_kwargs):
            raise IndexError(f"no captured inputs for layer {layer_index} (have {len(self.layer_kwargs)} layers)")
        memo: dict[int, Any] = {}
        move = lambda leaf: _move_leaf(leaf, device, dtype)  # noqa: E731
        return (
            map_leaves(self.layer_args[layer_index], move, memo),
            map_leaves(self.layer_kwargs[layer_index], move, memo),
        )


# --------------------------------------------------------------------------- running one layer
def _layer_dtype(layer: nn.Module) -> torch.dtype:
    for parameter in layer.parameters():
        if parameter.is_floating_point():
            return parameter.dtype
    return torch.float32


def _layer_device(layer: nn.Module) -> torch.device:
    for parameter in layer.parameters():
        return parameter.device
    return torch.device("cpu")


def _resolve_layer_index(layer: nn.Module, inputs: LayerInputs, layer_index: int | None) -> int:
    if layer_index is not None:
        return layer_index
    index = getattr(layer, LAYER_INDEX_ATTRIBUTE, None)
    if index is None:
        raise ValueError("layer has no prinmix_layer_index (not made by DecoderStack.build_layer): pass layer_index")
    return int(index)


def forward_batches(
    layer: nn.Module,
    inputs: LayerInputs,
    batch_size: int,
    layer_index: int | None,
    before_batch: Callable[[int], None] | None = None,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (start, float32 output [b, seq, d] on the layer's device) for each mini-batch of the calibration set."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    index = _resolve_layer_index(layer, inputs, layer_index)
    device, dtype = _layer_device(layer), _layer_dtype(layer)
    args, kwargs = inputs.call_arguments(index, device, dtype)
    for start in range(0, inputs.n_sequences, batch_size):
        hidden = inputs.hidden[start : start + batch_size].to(device=device, dtype=dtype)
        batch = hidden.shape[0]
        memo: dict[int, Any] = {}
        expand = lambda leaf: _expand_leaf(leaf, batch)  # noqa: E731
        if before_batch is not None:
            before_batch(start)
        output = layer(hidden, *map_leaves(args, expand, memo), **map_leaves(kwargs, expand, memo))
        if isinstance(output, (tuple, list)):
            output = output[0]
        yield start, output.to(torch.float32)


def run_layer(
    layer: nn.Module, inputs: LayerInputs, batch_size: int = 8, layer_index: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Outputs [n, seq, d] float32 (on inputs.device) of `layer` over the calibration set, without grad.

    layer_index selects the captured call arguments; by default the index stamped by build_layer.
    The hidden states and floating kwargs are cast to the layer's parameter dtype for the forward.
    out: a float32 tensor shaped like inputs.hidden (not inputs.hidden itself) to write the outputs into.
    """
    if out is not None and (out.shape != inputs.hidden.shape or out.data_ptr() == inputs.hidden.data_ptr()):
        raise ValueError("out must have the shape of inputs.hidden and be a different buffer")
    outputs = out
    if outputs is None:
        outputs = torch.empty(inputs.hidden.shape, dtype=torch.float32, device=inputs.device)
    with torch.no_grad():
        for start, output in forward_batches(layer, inputs, batch_size, layer_index):
            outputs[start : start + output.shape[0]] = output.to(outputs.device)
    return outputs
