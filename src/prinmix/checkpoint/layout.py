"""Where a model's module tensors live in its checkpoint, when the names or shapes differ.

transformers 5 renames and fuses tensors while loading: a Mixtral checkpoint stores each expert's
w1/w2/w3 as 2-D tensors (`model.layers.0.block_sparse_moe.experts.3.w1.weight`) while the module
holds one fused 3-D parameter (`model.layers.0.mlp.experts.gate_up_proj` [E, 2·I, H]); a Gemma-3 or
LLaVA checkpoint names the text tower `language_model.model.layers…` while the module is
`model.language_model.layers…`. save_pretrained reverts this, so checkpoints on disk use the
original names. The mapping is read off transformers' own reverse conversion
(`revert_weight_conversion`) run on small *probe* tensors: a module tensor of shape [..., C] gets a
probe of shape [..., 1] holding distinct row numbers, so each reverted checkpoint tensor tells
exactly which rows of which module tensor it holds.

A checkpoint tensor is thus a `Piece`: rows [start, stop) of its module tensor viewed as
[-1, C] (or the whole tensor, renamed). Layouts other than contiguous row blocks (transposed or
interleaved experts) are refused with a CheckpointError naming the model type.
"""

from __future__ import annotations

import bisect
import copy
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

from prinmix.errors import CheckpointError


@dataclass(frozen=True)
class Piece:
    """Checkpoint tensor `name` = rows [start, stop) of a module tensor viewed as [-1, C] (C = last dim;
    for 1-D tensors: elements). whole: it is the entire tensor (a plain renaming, same shape)."""

    name: str
    start: int
    stop: int
    whole: bool


def meta_causal_lm(config, path, attn_implementation: str | None = None) -> nn.Module:
    """The model skeleton (meta device, float32, eager experts) for `config`: the causal-LM class, else the
    image-text-to-text class (vision-language models, run on text only); CheckpointError naming the
    architecture when transformers has neither."""
    kwargs = {"dtype": torch.float32, "experts_implementation": "eager"}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    for auto in (AutoModelForCausalLM, AutoModelForImageTextToText):
        try:
            with torch.device("meta"):
                return auto.from_config(copy.deepcopy(config), **kwargs).eval()
        except ValueError as exc:
            if "Unrecognized configuration class" not in str(exc):
                raise CheckpointError(f"{path}: transformers cannot build model_type "
                                      f"{config.model_type!r} ({str(exc).splitlines()[0]})") from exc
    arch = ",".join(getattr(config, "architectures", None) or []) or "?"
    raise CheckpointError(f"{path}: unsupported architecture: model_type {config.model_type!r} ({arch}) has no "
                          "causal-LM or image-text-to-text class in the installed transformers")


def _probe_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(shape[:-1]) + (1,) if len(shape) >= 2 else tuple(shape)


def revert_names(model: nn.Module, shapes: dict[str, tuple[int, ...]], where: str) -> dict[str, list[Piece]]:
    """{module tensor name: its checkpoint pieces, in row order} per transformers' save-time conversion.

    shapes: {full module tensor name: shape}. Module tensors transformers does not convert map to
    themselves. Raises CheckpointError (naming `where` and the model type) for layouts that are not
    contiguous row blocks.
    """
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # an older transformers converts nothing
        return {n: [Piece(n, 0, 0, True)] for n in shapes}
    names, offsets, probes, total = [], [], {}, 0
    for name, shape in shapes.items():
        probe_shape = _probe_shape(shape)
        count = 1
        for d in probe_shape:
            count *= d
        probes[name] = (torch.arange(count, dtype=torch.float64) + total).reshape(probe_shape)
        names.append(name)
        offsets.append(total)
        total += count
    model_type = getattr(getattr(model, "config", None), "model_type", "?")
    try:
        reverted = revert_weight_conversion(model, dict(probes))
    except Exception as exc:  # a conversion op transformers cannot run on probes: no way to map names
        raise CheckpointError(f"{where}: model_type {model_type!r}: cannot map module names to checkpoint names "
                              f"({type(exc).__name__}: {exc}); unsupported architecture") from exc
    result: dict[str, list[Piece]] = {n: [] for n in names}
    for ckpt_name, tensor in reverted.items():
        values = tensor.reshape(-1).to(torch.int64)
        if values.numel() == 0:
            continue
        k = bisect.bisect_right(offsets, int(values[0])) - 1
        owner, local = names[k], values - offsets[k]
        start, stop = int(local[0]), int(local[0]) + values.numel()
        probe = probes[owner]
        if not torch.equal(local, torch.arange(start, stop)) or stop > probe.numel():
            raise CheckpointError(f"{where}: model_type {model_type!r} stores {owner!r} as {ckpt_name!r} in a "
                                  "transposed or interleaved layout (unsupported architecture)")
        whole = start == 0 and stop == probe.numel() and tuple(tensor.shape) == tuple(probe.shape)
        result[owner].append(Piece(ckpt_name, start, stop, whole))
    for name, pieces in result.items():
        pieces.sort(key=lambda p: p.start)
        if not pieces or any(a.stop != b.start for a, b in zip(pieces, pieces[1:])) or pieces[0].start != 0 \
                or pieces[-1].stop != probes[name].numel():
            raise CheckpointError(f"{where}: model_type {model_type!r}: cannot tell where module tensor {name!r} "
                                  "is stored in the checkpoint (unsupported architecture)")
    return result


def piece_shape(piece: Piece, module_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape the checkpoint tensor of `piece` should have."""
    if piece.whole:
        return tuple(module_shape)
    if len(module_shape) == 1:
        return (piece.stop - piece.start,)
    return (piece.stop - piece.start, module_shape[-1])


@dataclass
class LinearSource:
    """What feeds a compressible checkpoint matrix: an nn.Linear module of the layer, or expert `expert`
    of a fused 3-D parameter (`module` is then the parameter name, relative to the layer)."""

    module: str
    expert: int | None = None


class LayerLayout:
    """Checkpoint ↔ module names of one decoder layer (names relative to the layer / its checkpoint prefix).

    pieces: {module tensor name: [Piece with checkpoint-relative names]}; prefix: the checkpoint-name
    prefix of the layer; linears: {checkpoint-relative matrix name (without ".weight"): LinearSource}.
    """

    def __init__(self, layer: nn.Module, full_pieces: dict[str, list[Piece]], module_prefix: str,
                 checkpoint_names: set[str], fallback: Callable[[str], Iterable[str]], where: str,
                 model_type: str) -> None:
        self.where, self.model_type = where, model_type
        self.shapes = {n: tuple(t.shape) for n, t in layer.state_dict(keep_vars=True).items()}
        resolved: dict[str, list[Piece]] = {}
        for rel in self.shapes:
            full = module_prefix + rel
            pieces = full_pieces.get(full) or [Piece(full, 0, 0, True)]
            if not all(p.name in checkpoint_names for p in pieces):
                alias = next((n for n in fallback(full) if n in checkpoint_names), None)
                pieces = [Piece(alias, 0, 0, True)] if alias is not None else pieces
            resolved[rel] = pieces
        self.prefix = self._checkpoint_prefix(resolved, module_prefix)
        self.pieces = {rel: [Piece(p.name[len(self.prefix):], p.start, p.stop, p.whole) for p in ps]
                       for rel, ps in resolved.items()}
        self.identity = all(len(ps) == 1 and ps[0].whole and ps[0].name == rel for rel, ps in self.pieces.items())
        self.linears = self._linears(layer)

    def _checkpoint_prefix(self, resolved: dict[str, list[Piece]], module_prefix: str) -> str:
        votes: dict[str, int] = {}
        for rel, pieces in resolved.items():
            for p in pieces:
                if p.whole and p.name.endswith(rel):
                    votes[p.name[: len(p.name) - len(rel)]] = votes.get(p.name[: len(p.name) - len(rel)], 0) + 1
        prefix = max(votes, key=votes.get) if votes else module_prefix
        outside = [p.name for ps in resolved.values() for p in ps if not p.name.startswith(prefix)]
        if outside:
            raise CheckpointError(f"{self.where}: model_type {self.model_type!r}: layer tensor {outside[0]!r} is "
                                  f"stored outside the layer's checkpoint prefix {prefix!r} (unsupported architecture)")
        return prefix

    def _linears(self, layer: nn.Module) -> dict[str, LinearSource]:
        out: dict[str, LinearSource] = {}
        for name, module in layer.named_modules():
            if isinstance(module, nn.Linear):
                for p in self.pieces.get(f"{name}.weight", []):
                    if p.name.endswith(".weight"):
                        out[p.name[: -len(".weight")]] = LinearSource(name)
        for rel, param in layer.named_parameters():
            if param.ndim != 3:
                continue
            owner = layer.get_submodule(rel.rpartition(".")[0]) if "." in rel else layer
            experts_like = hasattr(owner, "num_experts") or "expert" in type(owner).__name__.lower()
            pieces = self.pieces[rel]
            if len(pieces) == 1 and pieces[0].whole:
                if experts_like:
                    raise CheckpointError(
                        f"{self.where}: model_type {self.model_type!r} stores experts as one fused 3-D tensor "
                        f"{self.prefix + pieces[0].name!r} {list(param.shape)}; prinmix compresses 2-D matrices "
                        "(unsupported architecture)")
                continue
            if getattr(owner, "is_transposed", False):
                raise CheckpointError(f"{self.where}: model_type {self.model_type!r} keeps transposed expert "
                                      f"weights ({rel}); unsupported architecture")
            rows = param.shape[1]
            for p in pieces:
                expert = p.start // rows
                if p.stop > (expert + 1) * rows:
                    raise CheckpointError(f"{self.where}: checkpoint tensor {p.name!r} spans several experts of "
                                          f"{rel} (model_type {self.model_type!r}; unsupported architecture)")
                if p.name.endswith(".weight"):
                    out[p.name[: -len(".weight")]] = LinearSource(rel, expert)
        return out

    @property
    def expert_parameters(self) -> list[str]:
        """Layer-relative names of the fused 3-D expert parameters whose slices are compressible matrices."""
        return sorted({s.module for s in self.linears.values() if s.expert is not None})

    def to_module_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Checkpoint-relative tensors of the layer → module-relative tensors (fused expert parameters assembled)."""
        if self.identity:
            return state
        used, out = set(), {}
        for rel, pieces in self.pieces.items():
            missing = [p.name for p in pieces if p.name not in state]
            if missing:
                continue  # reported by build_layer as missing
            shape = self.shapes[rel]
            if len(pieces) == 1 and pieces[0].whole:
                out[rel] = state[pieces[0].name]
            else:
                first = state[pieces[0].name]
                full = torch.empty(shape, dtype=first.dtype, device=first.device)
                flat = full.view(-1, shape[-1]) if len(shape) >= 2 else full
                for p in pieces:
                    t = state[p.name]
                    want = piece_shape(p, shape)
                    if tuple(t.shape) != want:
                        raise CheckpointError(f"{self.where}: checkpoint tensor {p.name!r} has shape {list(t.shape)}, "
                                              f"expected {list(want)} (model_type {self.model_type!r})")
                    flat[p.start:p.stop] = t.reshape(flat[p.start:p.stop].shape)
                out[rel] = full
            used.update(p.name for p in pieces)
        out.update({k: v for k, v in state.items() if k not in used})  # reported by build_layer as unexpected
        return out

    def checkpoint_stats(self, stats: dict, expert_stats: dict) -> dict:
        """Re-key capture results by checkpoint-relative matrix name: stats {linear module name: stat},
        expert_stats {(parameter, expert): stat}."""
        out = {}
        for name, source in self.linears.items():
            stat = stats.get(source.module) if source.expert is None else expert_stats.get((source.module, source.expert))
            if stat is not None:
                out[name] = stat
        for stat in {id(s): s for s in out.values()}.values():
            stat.names = [n for n, s in out.items() if s is stat]
        return out
