"""Layer-by-layer execution of a Hugging Face causal LM, with at most one real decoder layer in memory.

`DecoderStack` instantiates the model skeleton on the meta device (no weights) from a checkpoint's
config and finds its decoder layers generically. Calibration then goes:

    stack = DecoderStack(reader)
    inputs = stack.embed(reader, input_ids, device)          # hidden states entering layer 0
    for i in range(stack.num_layers):
        layer = stack.build_layer(i, stack.read_layer_state(reader, i), device)
        stats, outputs = capture_hessians(layer, inputs, return_outputs=True)   # hessians.py
        inputs = inputs.with_hidden(outputs)                 # (or layer_inputs.run_layer)
    logits = stack.logits(reader, input_ids, inputs.hidden, device)

How the layers are found: among all nn.ModuleList modules of the skeleton whose children all share
one class, those whose length equals the (text) config's num_hidden_layers are preferred; of the
candidates, the one holding the most parameters wins (for a Llama: `model.layers`).

How the layer inputs are captured: every layer of a fresh meta skeleton is replaced by a recorder
module, and the model's own forward is run on the token ids. Only the modules that actually run
(embeddings, rotary embedding, ... and, for `logits`, the final norm and lm_head) get real weights,
materialised from the checkpoint by forward pre-hooks the first time they are called. Recorder 0
stores layer 0's hidden-state input and stops the forward (the "Catcher" trick); a second,
pass-through run on one and on two sequences records the extra positional args and kwargs each layer
receives (attention masks, position ids, position embeddings, ...; with per-layer differences such as
sliding-window masks) and tells which tensors carry a batch dimension, so that any mini-batch size
can be replayed later.
"""

from __future__ import annotations

import copy
import weakref
from typing import Any

import torch
from torch import nn

from ..checkpoint.layout import LayerLayout, meta_causal_lm, revert_names
from ..checkpoint.reader import CheckpointReader
from ..errors import CheckpointError
from .layer_inputs import LAYER_INDEX_ATTRIBUTE, LayerInputs, PerBatch

__all__ = ["DecoderStack"]


# --------------------------------------------------------------------------- recorders and runner
class _StopForward(Exception):
    """Raised by a recorder to end the model forward early."""


class _RecordingSession:
    """Shared state of the recorders replacing the layers of one runner model during one forward."""

    def __init__(self, num_layers: int, mode: str, return_tuple: bool, injected: torch.Tensor | None = None):
        self.num_layers = num_layers
        self.mode = mode  # "first_hidden" | "arguments" | "inject"
        self.return_tuple = return_tuple
        self.injected = injected
        self.first_hidden: torch.Tensor | None = None
        self.arguments: list[tuple[tuple, dict] | None] = [None] * num_layers
        self.last_output: torch.Tensor | None = None
        self.needs_tuple = False


class _LayerRecorder(nn.Module):
    """Stands in for decoder layer `index`: records what it is called with (see _RecordingSession.mode)."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index
        self.session: _RecordingSession | None = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        session = self.session
        if args:
            hidden, rest = args[0], tuple(args[1:])
        else:
            hidden, rest = kwargs.pop("hidden_states"), ()
        if session.mode == "first_hidden":
            session.first_hidden = hidden
            raise _StopForward
        if session.last_output is not None and (
            not isinstance(hidden, torch.Tensor) or hidden.shape != session.last_output.shape
        ):
            session.needs_tuple = True  # the model indexes layer outputs: layers return tuples
            raise _StopForward
        session.arguments[self.index] = (rest, kwargs)
        output = hidden
        if self.index == session.num_layers - 1:
            if session.mode == "arguments":
                raise _StopForward
            output = session.injected
        session.last_output = output
        return (output,) if session.return_tuple else output


def _is_meta_error(exc: BaseException) -> bool:
    return "meta" in str(exc).lower()


# --------------------------------------------------------------------------- the stack
class DecoderStack:
    """Structure of one causal LM (meta-device skeleton) and layer-by-layer execution helpers.

    reader: the checkpoint whose config (and tensor names) define the model; no weights are read here.
    attn_implementation: passed to transformers (None: its default, usually "sdpa").
    """

    def __init__(self, reader: CheckpointReader, attn_implementation: str | None = None) -> None:
        self._path = reader.path
        self._config = copy.deepcopy(reader.config)
        self._attn_implementation = attn_implementation
        self._checkpoint_names = set(reader.tensor_names)
        self._skeleton = self._meta_model()
        self._layers_path, layers = self._find_layers(self._skeleton)
        self._layers = layers
        self._strip_prefix = self._checkpoint_prefix_to_strip()
        self._layer_names_cache: dict[int, list[str]] = {}
        self._layouts: dict[int, LayerLayout] = {}
        self._outer_names: dict[str, str] | None = None
        self.layout(0)  # refuse unsupported layer layouts (e.g. fused 3-D experts in the checkpoint) up front

    # ------------------------------------------------------------------ structure
    def _meta_model(self) -> nn.Module:
        return meta_causal_lm(self._config, self._path, self._attn_implementation)

    def _find_layers(self, model: nn.Module) -> tuple[str, nn.ModuleList]:
        expected = getattr(self._config.get_text_config(), "num_hidden_layers", None)
        best: tuple[tuple[bool, int, int], str, nn.ModuleList] | None = None
        for name, module in model.named_modules():
            if not isinstance(module, nn.ModuleList) or len(module) == 0:
                continue
            if len({type(child) for child in module}) != 1:
                continue
            size = sum(p.numel() for p in module.parameters())
            key = (len(module) == expected, size, len(module))
            if best is None or key > best[0]:
                best = (key, name, module)
        if best is None:
            raise CheckpointError(f"{self._path}: no list of decoder layers found in {type(model).__name__}")
        return best[1], best[2]

    def _checkpoint_prefix_to_strip(self) -> str:
        """'' when checkpoint names equal module names; the base-model prefix when the checkpoint lacks it."""
        prefix = getattr(self._skeleton, "base_model_prefix", "")
        names = [n for n, _ in self._skeleton.named_parameters()]
        direct = sum(n in self._checkpoint_names for n in names)
        if prefix:
            stripped = sum(n.startswith(prefix + ".") and n[len(prefix) + 1 :] in self._checkpoint_names for n in names)
            if stripped > direct:
                return prefix + "."
        return ""

    def _strip(self, module_name: str) -> str:
        if self._strip_prefix and module_name.startswith(self._strip_prefix):
            return module_name[len(self._strip_prefix) :]
        return module_name

    def _to_checkpoint_name(self, module_name: str) -> str:
        """Checkpoint name of a tensor outside the layers (transformers' save-time renaming, e.g. VLM towers)."""
        if self._outer_names is None:
            inside = f"{self._layers_path}."
            shapes = {n: tuple(t.shape) for n, t in self._skeleton.state_dict(keep_vars=True).items()
                      if not n.startswith(inside)}
            pieces = revert_names(self._skeleton, shapes, str(self._path))
            self._outer_names = {n: ps[0].name for n, ps in pieces.items()
                                 if len(ps) == 1 and ps[0].whole and ps[0].name in self._checkpoint_names}
        return self._outer_names.get(module_name) or self._strip(module_name)

    def layout(self, i: int) -> LayerLayout:
        """Checkpoint ↔ module names of layer i (renamed tensors, fused expert parameters; see layout.py)."""
        self._check_index(i)
        if i not in self._layouts:
            module_prefix = f"{self._layers_path}.{i}."
            layer = self._layers[i]
            shapes = {module_prefix + n: tuple(t.shape) for n, t in layer.state_dict(keep_vars=True).items()}
            pieces = revert_names(self._skeleton, shapes, str(self._path))
            self._layouts[i] = LayerLayout(layer, pieces, module_prefix, self._checkpoint_names,
                                           lambda n: [self._strip(n)], str(self._path), self._config.model_type)
        return self._layouts[i]

    @property
    def config(self):
        """The transformers config (a private copy)."""
        return self._config

    @property
    def num_layers(self) -> int:
        return len(self._layers)

    @property
    def layers_path(self) -> str:
        """Module path of the decoder layer list in the model, e.g. "model.layers"."""
        return self._layers_path

    @property
    def layer_class(self) -> type[nn.Module]:
        return type(self._layers[0])

    def _check_index(self, i: int) -> None:
        if not 0 <= i < self.num_layers:
            raise IndexError(f"layer index {i} out of range (model has {self.num_layers} layers)")

    def layer_prefix(self, i: int) -> str:
        """Checkpoint-name prefix of layer i, e.g. "model.layers.3."."""
        return self.layout(i).prefix

    def linear_names(self, i: int) -> list[str]:
        """Names, relative to the layer, of the nn.Linear modules of layer i (e.g. "self_attn.q_proj").

        When the checkpoint stores the layer differently (renamed modules, fused expert parameters stored
        per expert), these are the checkpoint-relative names of its 2-D matrices (name + ".weight" is
        the checkpoint tensor), e.g. "block_sparse_moe.experts.3.w1" of a Mixtral.
        """
        layout = self.layout(i)
        if layout.identity:
            return [name for name, module in self._layers[i].named_modules() if isinstance(module, nn.Linear)]
        return list(layout.linears)

    def layer_tensor_names(self, i: int) -> list[str]:
        """All checkpoint tensor names (full names) that belong to layer i, sorted."""
        if i not in self._layer_names_cache:
            prefix = self.layer_prefix(i)
            self._layer_names_cache[i] = sorted(n for n in self._checkpoint_names if n.startswith(prefix))
        return list(self._layer_names_cache[i])

    @property
    def non_layer_tensor_names(self) -> list[str]:
        """Checkpoint tensor names outside the decoder layers (embeddings, final norm, lm_head, ...), sorted."""
        inside = set()
        for i in range(self.num_layers):
            inside.update(self.layer_tensor_names(i))
        return sorted(self._checkpoint_names - inside)

    def output_embedding_name(self) -> str | None:
        """Checkpoint name of the output head's weight (e.g. "lm_head.weight"); None when the model has none."""
        model = self._meta_model()
        head = model.get_output_embeddings()
        if head is None:
            return None
        for name, module in model.named_modules():
            if module is head:
                return self._to_checkpoint_name(f"{name}.weight" if name else "weight")
        return None

    # ------------------------------------------------------------------ layers
    def read_layer_state(
        self, reader: CheckpointReader, i: int, dtype: torch.dtype | None = torch.float32, device="cpu"
    ) -> dict[str, torch.Tensor]:
        """{name relative to layer_prefix(i): tensor} of layer i read from `reader` (NaN/Inf checked)."""
        prefix = self.layer_prefix(i)
        return {name[len(prefix) :]: reader.get(name, dtype=dtype, device=device) for name in self.layer_tensor_names(i)}

    def build_layer(
        self,
        i: int,
        state_dict: dict[str, torch.Tensor],
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> nn.Module:
        """A standalone, eval-mode copy of layer i holding `state_dict` (names relative to the layer).

        Floating tensors are converted to `dtype` on `device`; parameters do not require grad.
        Non-persistent buffers (if the layer has any) are initialised the way transformers does.
        The module carries attribute `prinmix_layer_index = i` so run_layer knows its kwargs.
        """
        layout = self.layout(i)
        state_dict = layout.to_module_state(state_dict)
        layer = copy.deepcopy(self._layers[i])
        expected = set(layer.state_dict().keys())
        missing = sorted(expected - state_dict.keys())
        unexpected = sorted(state_dict.keys() - expected)
        if missing or unexpected:
            raise CheckpointError(
                f"{self._path}: layer {i} ({self.layer_prefix(i)}) tensors do not match the architecture "
                f"(missing {missing[:4]}, unexpected {unexpected[:4]})"
            )
        converted = {
            name: tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)
            for name, tensor in state_dict.items()
        }
        layer.load_state_dict(converted, strict=True, assign=True)
        for module_name, module in layer.named_modules():
            meta_buffers = [n for n, b in module._buffers.items() if b is not None and b.is_meta]
            if meta_buffers:
                self._initialise_buffers(module, f"layer {i} {module_name}", meta_buffers, device)
        for parameter in layer.parameters():
            parameter.requires_grad_(False)
        setattr(layer, LAYER_INDEX_ATTRIBUTE, i)
        if not layout.identity:
            layer.prinmix_layout = layout  # capture_hessians keys its results by checkpoint name
        return layer.eval()

    def _initialise_buffers(self, module: nn.Module, label: str, names: list[str], device) -> None:
        """Give `module`'s meta buffers `names` real values via transformers' _init_weights (e.g. RoPE inv_freq).

        Tensors already loaded are flagged `_is_hf_initialized` so transformers' guarded init
        functions leave them alone; a buffer still NaN afterwards means the model type is unsupported.
        """
        for tensor in list(module._parameters.values()) + list(module._buffers.values()):
            if tensor is not None and not tensor.is_meta:
                tensor._is_hf_initialized = True
        for name in names:
            buffer = module._buffers[name]
            fill = float("nan") if buffer.is_floating_point() else 0
            module._buffers[name] = torch.full(buffer.shape, fill, dtype=buffer.dtype, device=device)
        with torch.no_grad():
            self._skeleton._init_weights(module)
        for name in names:
            buffer = module._buffers[name]
            if buffer.is_floating_point() and not bool(torch.isfinite(buffer).all()):
                raise CheckpointError(
                    f"{self._path}: cannot initialise buffer {name!r} of {label.strip()} "
                    f"(model_type {self._config.model_type!r} is not supported)"
                )

    # ------------------------------------------------------------------ runner (non-layer modules)
    def _runner(self, reader: CheckpointReader, device: torch.device | str) -> tuple[nn.Module, list[_LayerRecorder]]:
        """A fresh meta skeleton whose layers are recorders and whose other modules load weights on first call."""
        model = self._meta_model()
        parent_path, _, attribute = self._layers_path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        recorders = [_LayerRecorder(i) for i in range(self.num_layers)]
        setattr(parent, attribute, nn.ModuleList(recorders))
        materialised: dict[int, nn.Parameter] = {}
        names_of: dict[int, list[str]] = {}
        for name, parameter in model.named_parameters(remove_duplicate=False):
            names_of.setdefault(id(parameter), []).append(name)

        def materialise(module_name: str, module: nn.Module) -> None:
            self._materialise_module(reader, module_name, module, device, materialised, names_of)

        for module_name, module in model.named_modules():
            if isinstance(module, _LayerRecorder):
                continue
            module.register_forward_pre_hook(lambda mod, _args, _n=module_name: materialise(_n, mod))
        model_ref = weakref.ref(model)  # no reference cycle: the model (its float32 embeddings) dies with its last user
        model._prinmix_materialise_all = lambda: [  # used when a module's weights are read without calling it
            materialise(n, m) for n, m in model_ref().named_modules() if not isinstance(m, _LayerRecorder)
        ]
        return model, recorders

    def _materialise_module(self, reader, module_name, module, device, materialised, names_of) -> None:
        """Load `module`'s own meta parameters/buffers from the checkpoint (float32) onto `device`."""
        for name, parameter in module._parameters.items():
            if parameter is None or not parameter.is_meta:
                continue
            if id(parameter) not in materialised:
                fresh = nn.Parameter(torch.empty(parameter.shape, dtype=torch.float32, device=device), requires_grad=False)
                self._load_parameter(reader, fresh, names_of[id(parameter)])
                materialised[id(parameter)] = fresh
            module._parameters[name] = materialised[id(parameter)]
        leftover = []
        for name, buffer in module._buffers.items():
            if buffer is None or not buffer.is_meta:
                continue
            checkpoint_name = self._to_checkpoint_name(f"{module_name}.{name}" if module_name else name)
            if name not in module._non_persistent_buffers_set and checkpoint_name in reader:
                module._buffers[name] = reader.get(checkpoint_name, dtype=None, device=device)
            else:
                leftover.append(name)
        if leftover:
            self._initialise_buffers(module, module_name or "model", leftover, device)

    def _load_parameter(self, reader: CheckpointReader, target: torch.Tensor, module_names: list[str]) -> None:
        for module_name in module_names:
            checkpoint_name = self._to_checkpoint_name(module_name)
            if checkpoint_name in reader:
                with torch.no_grad():
                    target.copy_(reader.get(checkpoint_name, dtype=None, device=target.device))  # cast in the copy
                return
        raise CheckpointError(f"{reader.path}: no tensor for {module_names[0]!r} (needed outside the decoder layers)")

    def _run(self, model: nn.Module, recorders, session: _RecordingSession, input_ids: torch.Tensor) -> Any:
        for recorder in recorders:
            recorder.session = session
        try:
            with torch.no_grad():
                return model(input_ids=input_ids, use_cache=False)
        except _StopForward:
            return None
        except (RuntimeError, NotImplementedError, TypeError) as exc:
            if not _is_meta_error(exc):
                raise
            model._prinmix_materialise_all()  # a module's weights were used without calling it
            with torch.no_grad():
                try:
                    return model(input_ids=input_ids, use_cache=False)
                except _StopForward:
                    return None

    def _capture_arguments(self, model, recorders, input_ids: torch.Tensor) -> list[tuple[tuple, dict]]:
        """Per-layer (args, kwargs) for the sequences of input_ids, via a pass-through run over all layers."""
        for return_tuple in (False, True):
            session = _RecordingSession(self.num_layers, "arguments", return_tuple)
            self._run(model, recorders, session, input_ids)
            if not session.needs_tuple:
                break
        missing = [i for i, a in enumerate(session.arguments) if a is None]
        if missing:
            raise CheckpointError(
                f"{self._path}: the model forward did not call decoder layers {missing[:4]} in order"
            )
        return session.arguments

    # ------------------------------------------------------------------ embed / logits
    def embed(
        self,
        reader: CheckpointReader,
        input_ids: torch.Tensor,
        device: torch.device | str = "cpu",
        batch_size: int = 8,
        out: torch.Tensor | None = None,
    ) -> LayerInputs:
        """Hidden states entering layer 0 ([n, seq, d] float32 on device) plus every layer's call arguments.

        input_ids: LongTensor [n, seq] without padding. Only the modules that run before layer 0
        are given weights (float32) from `reader`. out: a float32 [n, seq, d] tensor to write the
        hidden states into (e.g. memory-mapped, see offload.py) instead of a new one on device.
        """
        if input_ids.dim() != 2 or input_ids.shape[0] == 0:
            raise ValueError(f"input_ids must be a non-empty [n, seq] tensor, got shape {list(input_ids.shape)}")
        input_ids = input_ids.to(device=device, dtype=torch.long)
        model, recorders = self._runner(reader, device)
        hidden_parts = []
        for start in range(0, input_ids.shape[0], batch_size):
            session = _RecordingSession(self.num_layers, "first_hidden", False)
            self._run(model, recorders, session, input_ids[start : start + batch_size])
            if session.first_hidden is None:
                raise CheckpointError(f"{self._path}: the model forward never reached decoder layer 0")
            part = session.first_hidden.detach().to(torch.float32)
            if out is not None:
                if out.shape[0] != input_ids.shape[0] or out.shape[1:] != part.shape[1:]:
                    raise ValueError(f"out has shape {list(out.shape)}; the hidden states are "
                                     f"{[input_ids.shape[0], *part.shape[1:]]}")
                out[start : start + part.shape[0]] = part.to(out.device)
            else:
                hidden_parts.append(part)
        hidden = out if out is not None else torch.cat(hidden_parts)
        one = self._capture_arguments(model, recorders, input_ids[:1])
        pair_ids = input_ids[:2] if input_ids.shape[0] > 1 else input_ids[:1].repeat(2, 1)
        two = self._capture_arguments(model, recorders, pair_ids)
        memo: dict[int, Any] = {}
        layer_args, layer_kwargs = [], []
        for i in range(self.num_layers):
            args = self._batch_templates(one[i][0], two[i][0], memo, f"layer {i} positional args")
            kwargs = self._batch_templates(one[i][1], two[i][1], memo, f"layer {i} kwargs")
            layer_args.append(args)
            layer_kwargs.append(kwargs)
        return LayerInputs(hidden=hidden, layer_args=layer_args, layer_kwargs=layer_kwargs)

    def _batch_templates(self, single: Any, pair: Any, memo: dict[int, Any], where: str) -> Any:
        """Compare arguments captured for 1 and 2 sequences: wrap batch-dimensioned tensors in PerBatch."""
        if isinstance(single, torch.Tensor):
            key = id(single)
            if key in memo:
                return memo[key]
            if not isinstance(pair, torch.Tensor):
                raise CheckpointError(f"{self._path}: {where} change type with the batch size")
            single_d = single.detach()
            if pair.shape == single.shape:
                result = single_d
                same = [pair]
            elif single.dim() > 0 and single.shape[0] == 1 and pair.shape[0] == 2 and pair.shape[1:] == single.shape[1:]:
                result = PerBatch(single_d)
                same = [pair[0:1], pair[1:2]]
            else:
                raise CheckpointError(
                    f"{self._path}: {where} hold a tensor of shape {list(single.shape)} for one sequence "
                    f"but {list(pair.shape)} for two (unsupported batch layout)"
                )
            for other in same:
                equal = (
                    torch.allclose(other, single, rtol=1e-6, atol=1e-6)
                    if single.is_floating_point()
                    else torch.equal(other, single)
                )
                if not equal:
                    raise CheckpointError(
                        f"{self._path}: {where} depend on the token ids (unsupported for layer-wise calibration)"
                    )
            memo[key] = result
            return result
        if isinstance(single, tuple) and not hasattr(single, "_fields"):
            return tuple(self._batch_templates(s, p, memo, where) for s, p in zip(single, pair, strict=True))
        if isinstance(single, list):
            return [self._batch_templates(s, p, memo, where) for s, p in zip(single, pair, strict=True)]
        if isinstance(single, dict):
            if single.keys() != pair.keys():
                raise CheckpointError(f"{self._path}: {where} change keys with the batch size")
            return {k: self._batch_templates(v, pair[k], memo, where) for k, v in single.items()}
        return single

    def logits(
        self,
        reader: CheckpointReader,
        input_ids: torch.Tensor,
        final_hidden: torch.Tensor,
        device: torch.device | str = "cpu",
        batch_size: int = 8,
    ) -> torch.Tensor:
        """Logits [n, seq, vocab] (float32, on device) from the last layer's outputs final_hidden [n, seq, d].

        Runs the model's own forward with the decoder layers replaced, so whatever follows the
        layers (final norm, lm_head, logit soft-capping, ...) is applied with weights from `reader`.
        """
        model, recorders = self._runner(reader, device)
        parts = []
        for output in self._run_injected(model, recorders, input_ids, final_hidden, device, batch_size):
            if output is None:
                raise CheckpointError(f"{self._path}: the model forward stopped before producing logits")
            parts.append(output.logits.detach().float())
        return torch.cat(parts)

    def _run_injected(self, model, recorders, input_ids, final_hidden, device, batch_size):
        """Yield the model's output per batch of input_ids [n, seq] with the last layer's outputs replaced by
        final_hidden [n, seq, d] (None where a hook stopped the forward)."""
        if final_hidden.shape[:2] != input_ids.shape:
            raise ValueError(f"final_hidden {list(final_hidden.shape)} does not match input_ids {list(input_ids.shape)}")
        input_ids = input_ids.to(device=device, dtype=torch.long)
        return_tuple = False
        for start in range(0, input_ids.shape[0], batch_size):
            ids = input_ids[start : start + batch_size]
            injected = final_hidden[start : start + batch_size].to(device=device, dtype=torch.float32)
            for _attempt in range(2):
                session = _RecordingSession(self.num_layers, "inject", return_tuple, injected)
                output = self._run(model, recorders, session, ids)
                if not session.needs_tuple:
                    break
                return_tuple = True
            yield output

    def head_hessian(self, reader: CheckpointReader, input_ids: torch.Tensor, final_hidden: torch.Tensor,
                     device: torch.device | str = "cpu", batch_size: int = 8) -> torch.Tensor:
        """H = Σ hhᵀ [d, d] (float32) of the output head's inputs h — the final normed hidden states over
        every position of input_ids [n, seq] — from the last layer's outputs final_hidden [n, seq, d].

        Runs the model's forward after the layers (final norm, …, with `reader`'s weights) up to the output
        embedding's input, then stops: the logits are never computed."""
        model, recorders = self._runner(reader, device)
        head = model.get_output_embeddings()
        if head is None:
            raise CheckpointError(f"{self._path}: the model has no output embedding (lm_head)")
        acc: dict[str, torch.Tensor] = {}

        def record(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float32)
            acc["H"] = acc["H"] + x.T @ x if "H" in acc else x.T @ x
            raise _StopForward

        hook = head.register_forward_pre_hook(record, prepend=True)  # before its weights would be loaded
        try:
            for _ in self._run_injected(model, recorders, input_ids, final_hidden, device, batch_size):
                pass
        finally:
            hook.remove()
        if "H" not in acc:
            raise CheckpointError(f"{self._path}: the model forward never reached its output embedding")
        return acc["H"]
