"""`check_compatible(base, finetuned)`: whether two checkpoints can be diffed tensor by tensor."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ArchitectureMismatchError
from .reader import CheckpointReader

__all__ = ["STRUCTURAL_CONFIG_FIELDS", "CompatibilityReport", "check_compatible"]

# Config fields that must agree between a base and its fine-tune (when present in either).
STRUCTURAL_CONFIG_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "moe_intermediate_size",
    "num_experts",
    "num_local_experts",
    "n_routed_experts",
)


@dataclass
class CompatibilityReport:
    """What differs between a base and a compatible fine-tune.

    resized_vocab: {tensor name: (base shape, fine-tune shape)} for embedding / lm_head tensors whose
    row count changed with the vocabulary size. only_in_base / only_in_finetuned: tensor names
    present in just one checkpoint (e.g. an untied lm_head.weight in the fine-tune).
    """

    resized_vocab: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    only_in_base: list[str] = field(default_factory=list)
    only_in_finetuned: list[str] = field(default_factory=list)


def _vocab_size(reader: CheckpointReader) -> int | None:
    value = getattr(reader.config.get_text_config(), "vocab_size", None)
    return int(value) if value is not None else None


def check_compatible(base: CheckpointReader, finetuned: CheckpointReader) -> CompatibilityReport:
    """Raise ArchitectureMismatchError unless `finetuned` can be diffed against `base`.

    Checked: model_type, config.architectures (when both are set), the structural config fields
    (hidden size, layers, heads, kv heads, head_dim, intermediate size, expert counts) and, for every
    tensor name both hold, the shape. A shape change is allowed only for 2-D tensors whose row count
    equals each side's vocab_size with identical remaining dims (the fine-tune resized the
    vocabulary); such tensors are reported in the returned CompatibilityReport.
    """
    pair = f"base {base.path} vs fine-tune {finetuned.path}"
    if base.model_type != finetuned.model_type:
        raise ArchitectureMismatchError(f"{pair}: model_type {base.model_type!r} != {finetuned.model_type!r}")
    base_arch = base.config_dict.get("architectures")
    ft_arch = finetuned.config_dict.get("architectures")
    if base_arch and ft_arch and list(base_arch) != list(ft_arch):
        raise ArchitectureMismatchError(f"{pair}: architectures {base_arch} != {ft_arch}")
    base_text, ft_text = base.config.get_text_config(), finetuned.config.get_text_config()
    for field_name in STRUCTURAL_CONFIG_FIELDS:
        base_value, ft_value = getattr(base_text, field_name, None), getattr(ft_text, field_name, None)
        if base_value != ft_value:
            raise ArchitectureMismatchError(f"{pair}: config {field_name} {base_value} != {ft_value}")

    report = CompatibilityReport()
    base_names, ft_names = set(base.tensor_names), set(finetuned.tensor_names)
    report.only_in_base = sorted(base_names - ft_names)
    report.only_in_finetuned = sorted(ft_names - base_names)
    base_vocab, ft_vocab = _vocab_size(base), _vocab_size(finetuned)
    for name in sorted(base_names & ft_names):
        base_shape, ft_shape = base.shape(name), finetuned.shape(name)
        if base_shape == ft_shape:
            continue
        vocab_resize = (
            len(base_shape) == 2
            and len(ft_shape) == 2
            and base_shape[1:] == ft_shape[1:]
            and base_shape[0] == base_vocab
            and ft_shape[0] == ft_vocab
        )
        if not vocab_resize:
            raise ArchitectureMismatchError(
                f"{pair}: tensor {name!r} has shape {list(base_shape)} in the base but {list(ft_shape)} in the fine-tune"
            )
        report.resized_vocab[name] = (base_shape, ft_shape)
    return report
