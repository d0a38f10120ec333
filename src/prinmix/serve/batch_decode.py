"""Prefill and decode steps that hand back the next-token logits, so the server chooses each row's token.

MultiTenantModel.prefill / decode_step pick the argmax themselves; sampling per request needs the
logits, so these two mirror them on MultiTenantModel's public `forward` (same left padding, 0/1 mask
and position ids, same DecodeState, so DecodeState.join / drop work unchanged) and leave the choice
to the caller, which appends the chosen token with `append_tokens`. Should the runtime grow a
token-choice hook on prefill / decode_step, this module goes away.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch
from transformers import DynamicCache

from ..runtime.decode_state import DecodeState, SequenceState, left_padded

__all__ = ["append_tokens", "decode_logits", "prefill_logits"]


def prefill_logits(model, prompts: Sequence[Sequence[int]], tenants: Sequence[str | None],
                   seq_ids: Sequence[Hashable]) -> tuple[DecodeState, torch.Tensor]:
    """One left-padded forward over the prompts (token ids): (the state, with nothing generated yet;
    the logits of each prompt's next token [B, vocab])."""
    ids, mask, positions = left_padded(prompts)
    mask, positions = mask.to(model.device), positions.to(model.device)
    cache = DynamicCache()
    logits = model.forward(ids, list(tenants), attention_mask=mask, position_ids=positions, cache=cache,
                           last_only=True)
    seqs = [SequenceState(sid, t, list(p)) for sid, t, p in zip(seq_ids, tenants, prompts)]
    return DecodeState(seqs, cache, mask), logits[:, -1]


def decode_logits(state: DecodeState, model) -> torch.Tensor:
    """Feed every sequence's last token (one forward); the logits of each one's next token [B, vocab]."""
    ids = torch.tensor([[s.generated[-1]] for s in state.seqs], dtype=torch.long)
    positions = torch.tensor([[s.next_position] for s in state.seqs], dtype=torch.long, device=model.device)
    state.mask = torch.cat([state.mask, torch.ones(len(state), 1, dtype=state.mask.dtype,
                                                    device=state.mask.device)], 1)
    logits = model.forward(ids, [s.tenant for s in state.seqs], attention_mask=state.mask, position_ids=positions,
                           cache=state.cache, last_only=True)
    return logits[:, -1]


def append_tokens(state: DecodeState, tokens: list[int]) -> None:
    """Record the chosen next token of each sequence (row order of the state)."""
    for s, token in zip(state.seqs, tokens):
        s.generated.append(token)
