"""The text the measured whole-budget split (budget_split.py) measures each part's effect on.

Half of the probe is calibration windows (the text the user says the model sees), half is text the
fine-tune samples itself from its start token: the distribution it was tuned towards. Why both —
measured on the demo pair (tiny Llama fine-tuned on arithmetic, built-in generic calibration text,
KL(p_ft ‖ p) on held-out arithmetic text; benchmarks/README.md "Sharing the whole budget"): a task
fine-tune changes the embedding rows of its task's tokens, which generic calibration text seldom
contains, so on calibration text alone dropping those rows looks harmless —

| whole α | proportional | measured, calibration only | measured, calibration + samples |
|---|---|---|---|
| 1/16 | KL 0.00001 (31.7 % to the vocabulary rows) | 0.00103 (16.7 %; embedding at its floor) | 0.00003 (18.3 %) |
| 1/32 | 0.00202 (31.7 %) | 0.00094 (33.9 %) | **0.00036** (23.4 %) |

Sampling: temperature 1, no top-k / top-p (the model's own distribution, whose expectation the KL is),
end-of-text suppressed so every sequence is as long as the windows, a seeded generator independent of
the global RNG. It needs the whole fine-tune in memory once (built from its reader, so a LoRA-adapter
input works); where that would take more than MEMORY_FRACTION of the free memory, the checkpoint does not
load into its transformers class or its probabilities overflow, the probe is calibration windows only and
`source` says so.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM

__all__ = ["GENERATED_SHARE", "MEMORY_FRACTION", "SAMPLE_TOKENS", "EffectProbe", "effect_probe", "sample_fine_tune"]

GENERATED_SHARE = 0.5    # of the probe's sequences sampled from the fine-tune
MEMORY_FRACTION = 0.5    # of the device's free memory the sampling model may take
SAMPLE_TOKENS = 128      # tokens per sample: a window holds several, generated as one batch (decode steps,
                         # not batch rows, are what sampling costs: 4× fewer for a 512-token window)


@dataclass
class EffectProbe:
    """Token ids [n, seq] the effects are measured on, and where they came from."""

    ids: torch.Tensor
    device: torch.device | str = "cpu"
    batch_size: int = 8
    source: str = "calibration"   # "calibration" or "calibration+generated"


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _start_token(config) -> int | None:
    text = config.get_text_config()
    for token in (getattr(text, "bos_token_id", None), getattr(config, "bos_token_id", None),
                  getattr(text, "eos_token_id", None)):
        token = token[0] if isinstance(token, (list, tuple)) and token else token
        if isinstance(token, int):
            return token
    return None


@torch.no_grad()
def sample_fine_tune(ft_r, n: int, seqlen: int, seed: int, device: torch.device,
                     start: torch.Tensor | None = None) -> torch.Tensor | None:
    """n windows [n, seqlen] of text sampled from the fine-tune ft_r (a CheckpointReader): each window is
    ⌈seqlen / SAMPLE_TOKENS⌉ samples of SAMPLE_TOKENS tokens back to back (documents packed as calibration
    windows are), each from the start token (or from start [n], the windows' first tokens, where the
    config names none); None where it cannot be sampled here (module docstring)."""
    device = torch.device(device)
    names = ft_r.tensor_names
    dtype = ft_r.dtype(names[0])
    size = sum(math.prod(ft_r.shape(name)) for name in names) * dtype.itemsize
    first = _start_token(ft_r.config)
    if size > MEMORY_FRACTION * _free_bytes(device) or (first is None and start is None):
        return None
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):   # the global RNG untouched
        try:
            model = AutoModelForCausalLM.from_config(ft_r.config, dtype=dtype)
        except (ValueError, KeyError):   # a config its transformers class cannot build
            return None
        wanted = model.state_dict()
        if any(k not in ft_r and not (k == "lm_head.weight" and ft_r.tied_embeddings) for k in wanted):
            return None   # checkpoint names that are not its class's
        model.load_state_dict({k: ft_r.get(k, dtype=dtype) for k in wanted if k in ft_r}, strict=False)
        model.tie_weights()
        model = model.to(device).eval()
        length = min(SAMPLE_TOKENS, seqlen)
        pieces = -(-seqlen // length)
        prompt = (torch.full((n * pieces, 1), first) if first is not None
                  else start.reshape(n).repeat_interleave(pieces)[:, None]).to(device)
        torch.manual_seed(seed)
        try:
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True, temperature=1.0,
                                 top_k=0, top_p=1.0, max_new_tokens=length - 1, min_new_tokens=length - 1,
                                 pad_token_id=first if first is not None else 0)
        except RuntimeError:   # probabilities that overflow (a broken fine-tune: the pass then says what is wrong)
            return None
    return out[:, :length].reshape(n, pieces * length)[:, :seqlen].cpu()


def effect_probe(ft_r, calib_ids: torch.Tensor, n: int, seed: int, device, batch_size: int) -> EffectProbe:
    """The probe of n sequences: the first n − k calibration windows of calib_ids [N, seq], then k windows
    of the fine-tune's samples, k = round(GENERATED_SHARE·n) ≥ 1 (calibration windows alone where it cannot
    sample, or n < 2)."""
    n = min(n, calib_ids.shape[0])
    k = max(1, round(GENERATED_SHARE * n)) if n >= 2 else 0   # one window alone stays calibration text
    generated = sample_fine_tune(ft_r, k, calib_ids.shape[1], seed, device, calib_ids[:k, 0]) if k else None
    if generated is None:
        return EffectProbe(calib_ids[:n], device, batch_size, "calibration")
    ids = torch.cat([calib_ids[: n - k].cpu(), generated]).to(calib_ids.dtype)
    return EffectProbe(ids, device, batch_size, "calibration+generated")
