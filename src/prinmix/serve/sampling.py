"""Per-request token choice for a batched decode step: greedy, or temperature / top-k / top-p sampling.

Each row of a step's logits [B, vocab] belongs to one request with its own SamplingParams. The
filters run for the whole batch at once (float32); the draw uses the request's own torch.Generator,
seeded by its `seed`, so a seeded request gives the same tokens whatever other requests share its
batch (up to the float rounding of the batched forward itself). Greedy (temperature 0, or top_k 1)
is the argmax of the raw logits, the same token `transformers` greedy `generate` picks.

Logprobs are those of the model's distribution, log_softmax of the raw logits (as vLLM returns by
default), not of the filtered one.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import torch

__all__ = ["SamplingParams", "TokenLogprob", "choose_tokens", "filter_logits", "new_generator"]


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 = greedy; top_k 0 = off; top_p 1 = off; seed None = a fresh random one;
    logprobs None = none returned, k ≥ 0 = the chosen token's logprob and the k most likely alternatives."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    logprobs: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log probability and its `top` most likely alternatives [(token id, logprob)]."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]


def new_generator(params: SamplingParams, device) -> torch.Generator | None:
    """The request's generator (None when greedy): seeded with `seed`, else with 63 random bits."""
    if params.greedy:
        return None
    g = torch.Generator(device=device)
    g.manual_seed((secrets.randbits(63) if params.seed is None else params.seed) % 2**64)
    return g


def filter_logits(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                  top_p: torch.Tensor) -> torch.Tensor:
    """Scaled, filtered logits: logits [B, V] / temperature [B] (> 0), then -inf outside each row's top_k
    [B] (0 = keep all) most likely tokens and outside its nucleus: the most likely tokens whose
    probabilities, summed in descending order, first reach top_p [B] (the most likely token always stays).
    Ties at the cut are broken by sort order, so exactly top_k tokens survive the top-k filter."""
    scaled = logits.float() / temperature.float().unsqueeze(1)
    ordered, order = scaled.sort(dim=-1, descending=True)
    rank = torch.arange(scaled.shape[-1], device=scaled.device).unsqueeze(0)
    k = torch.where(top_k > 0, top_k, scaled.shape[-1]).unsqueeze(1)
    drop = rank >= k
    probs = ordered.masked_fill(drop, float("-inf")).softmax(-1)
    mass_before = probs.cumsum(-1) - probs                 # probability of the more likely tokens
    drop |= mass_before >= top_p.float().unsqueeze(1)
    drop[:, 0] = False
    return scaled.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), float("-inf"))


def choose_tokens(logits: torch.Tensor, params: list[SamplingParams],
                  generators: list[torch.Generator | None]) -> tuple[list[int], list[TokenLogprob | None]]:
    """The next token of each row of logits [B, V] and, where asked for, its TokenLogprob."""
    chosen = logits.argmax(-1)
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    if sampled:
        rows = torch.tensor(sampled, device=logits.device)
        pick = [params[i] for i in sampled]
        filtered = filter_logits(logits.index_select(0, rows),
                                 torch.tensor([p.temperature for p in pick], device=logits.device),
                                 torch.tensor([p.top_k for p in pick], device=logits.device),
                                 torch.tensor([p.top_p for p in pick], device=logits.device))
        probs = filtered.softmax(-1)
        for j, i in enumerate(sampled):
            chosen[i] = torch.multinomial(probs[j], 1, generator=generators[i])[0]
    tokens = chosen.tolist()
    entries: list[TokenLogprob | None] = [None] * len(params)
    wanted = [i for i, p in enumerate(params) if p.logprobs is not None]
    if wanted:
        logp = logits.index_select(0, torch.tensor(wanted, device=logits.device)).float().log_softmax(-1)
        for j, i in enumerate(wanted):
            top = logp[j].topk(params[i].logprobs) if params[i].logprobs else None
            alternatives = tuple(zip(top.indices.tolist(), top.values.tolist())) if top is not None else ()
            entries[i] = TokenLogprob(tokens[i], float(logp[j, tokens[i]]), alternatives)
    return tokens, entries
