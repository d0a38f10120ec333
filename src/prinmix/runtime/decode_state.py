"""The running batch of a continuous-batching decoder: its sequences, KV cache and attention mask.

KV cache: one transformers DynamicCache for the batch, [B, kv_heads, L, head_dim] per layer, every
sequence right-aligned (left padding) with a 0/1 attention mask [B, L]. Joining left-pads the
shorter state's keys/values with zeros (masked out); leaving selects the remaining rows and trims
columns that are padding for all of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable

import torch
from transformers import DynamicCache

from ..errors import PrinmixError

__all__ = ["DecodeState", "SequenceState", "cache_tensors", "left_padded", "make_cache"]


@dataclass
class SequenceState:
    seq_id: Hashable
    tenant: str | None
    prompt: list[int]
    generated: list[int] = field(default_factory=list)

    @property
    def next_position(self) -> int:
        """Position id of the last generated token, the one the next decode step feeds."""
        return len(self.prompt) + len(self.generated) - 1


@dataclass
class DecodeState:
    """The running batch: its sequences (row order of the cache), KV cache and 0/1 attention mask [B, L]."""

    seqs: list[SequenceState]
    cache: object
    mask: torch.Tensor

    @property
    def seq_ids(self) -> list[Hashable]:
        return [s.seq_id for s in self.seqs]

    @property
    def next_tokens(self) -> list[int]:
        """The token each sequence produced in the last step."""
        return [s.generated[-1] for s in self.seqs]

    def __len__(self) -> int:
        return len(self.seqs)

    def kv_bytes(self) -> int:
        """Bytes of the KV cache (keys and values of every layer, padding included)."""
        return sum(t.numel() * t.element_size() for kv in cache_tensors(self.cache) for t in kv)

    @staticmethod
    def join(a: "DecodeState", b: "DecodeState") -> "DecodeState":
        """One batch holding a's then b's sequences (caches left-padded to the longer one)."""
        if set(a.seq_ids) & set(b.seq_ids):
            raise PrinmixError("cannot join decode states that share sequence ids")
        if not a.seqs:
            return b
        if not b.seqs:
            return a
        length = max(a.mask.shape[1], b.mask.shape[1])
        layers = []
        for (ka, va), (kb, vb) in zip(cache_tensors(a.cache), cache_tensors(b.cache)):
            layers.append((torch.cat([_left_pad(ka, length), _left_pad(kb, length)]),
                           torch.cat([_left_pad(va, length), _left_pad(vb, length)])))
        mask = torch.cat([_left_pad(a.mask, length, dim=1), _left_pad(b.mask, length, dim=1)])
        return DecodeState(a.seqs + b.seqs, make_cache(layers), mask)

    def drop(self, seq_ids) -> None:
        """Remove these sequences from the batch (in place); trims all-padding cache columns."""
        gone = set(seq_ids)
        keep = [i for i, s in enumerate(self.seqs) if s.seq_id not in gone]
        if len(keep) == len(self.seqs):
            return
        self.seqs = [self.seqs[i] for i in keep]
        idx = torch.tensor(keep, dtype=torch.long, device=self.mask.device)
        mask = self.mask.index_select(0, idx)
        used = mask.any(0).nonzero()
        first = int(used[0]) if used.numel() else mask.shape[1]
        self.mask = mask[:, first:]
        self.cache = make_cache([(k.index_select(0, idx)[:, :, first:], v.index_select(0, idx)[:, :, first:])
                                  for k, v in cache_tensors(self.cache)])


def _left_pad(t: torch.Tensor, length: int, dim: int = 2) -> torch.Tensor:
    extra = length - t.shape[dim]
    if extra == 0:
        return t
    shape = list(t.shape)
    shape[dim] = extra
    return torch.cat([torch.zeros(shape, dtype=t.dtype, device=t.device), t], dim=dim)


def cache_tensors(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))                    # transformers < 4.56


def make_cache(layers):
    cache = DynamicCache()
    for i, (k, v) in enumerate(layers):
        cache.update(k, v, i)
    return cache


def left_padded(prompts) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token-id lists right-aligned in one batch: ids, 0/1 attention mask and position ids, int64 [B, L]
    (positions count each sequence's own tokens from 0; padding gets 0)."""
    length = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), length, dtype=torch.long)
    mask = torch.zeros(len(prompts), length, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, length - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
        mask[i, length - len(p):] = 1
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)
