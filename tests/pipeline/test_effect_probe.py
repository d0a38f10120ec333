"""The measured split's probe text (pipeline/effect_probe.py): the fine-tune's own samples, checked against
the fine-tune's next-token distribution from a plain transformers forward; calibration windows kept; the
fallback where the model cannot be sampled; a LoRA-adapter input."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from prinmix.checkpoint.lora_source import LoraFinetunedReader
from prinmix.checkpoint.reader import CheckpointReader
from prinmix.pipeline import effect_probe as ep


def _first_token_probs(model_dir, bos: int) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        return torch.softmax(model(torch.tensor([[bos]])).logits[0, -1].double(), -1)


def test_samples_follow_the_fine_tunes_distribution(tiny_pair):
    """The token after the start token, over 2000 samples, has the frequencies of softmax(logits) of a
    transformers forward (each of the 8 likeliest tokens within 4.5 binomial σ, the rest in one bin)."""
    _, ft = tiny_pair("llama")
    reader = CheckpointReader(ft)
    bos = reader.config.bos_token_id
    n = 2000
    ids = ep.sample_fine_tune(reader, n, 3, seed=0, device=torch.device("cpu"))
    assert ids.shape == (n, 3) and bool((ids[:, 0] == bos).all())
    p = _first_token_probs(ft, bos)
    counts = torch.bincount(ids[:, 1], minlength=p.numel()).double()
    top = torch.argsort(p, descending=True)[:8]
    bins = [(p[t], counts[t]) for t in top] + [(1 - p[top].sum(), n - counts[top].sum())]
    for prob, count in bins:
        sigma = math.sqrt(n * prob * (1 - prob))
        assert abs(count - n * prob) <= 4.5 * sigma + 1, (float(prob), float(count))
    assert float(p[top[0]]) < 0.9   # a distribution worth sampling: the check above could fail


def test_seeded_and_leaves_the_global_rng_alone(tiny_pair):
    _, ft = tiny_pair("llama")
    reader = CheckpointReader(ft)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = ep.sample_fine_tune(reader, 4, 16, seed=7, device=torch.device("cpu"))
    assert torch.equal(torch.rand(3), expected_next)
    assert torch.equal(a, ep.sample_fine_tune(reader, 4, 16, seed=7, device=torch.device("cpu")))
    assert not torch.equal(a, ep.sample_fine_tune(reader, 4, 16, seed=8, device=torch.device("cpu")))
    # end-of-text is suppressed: every sequence runs to the window's length
    assert a.shape == (4, 16) and not bool((a[:, 1:] == reader.config.eos_token_id).any())


def test_probe_is_calibration_then_samples_and_falls_back(tiny_pair, monkeypatch):
    _, ft = tiny_pair("llama")
    reader = CheckpointReader(ft)
    calib = torch.randint(3, 100, (6, 12), generator=torch.Generator().manual_seed(0))
    probe = ep.effect_probe(reader, calib, 4, seed=0, device="cpu", batch_size=2)
    assert probe.source == "calibration+generated" and probe.ids.shape == (4, 12)
    assert torch.equal(probe.ids[:2], calib[:2])
    assert bool((probe.ids[2:, 0] == reader.config.bos_token_id).all())
    monkeypatch.setattr(ep, "MEMORY_FRACTION", 0.0)   # a model too large to hold: calibration text only
    probe = ep.effect_probe(reader, calib, 4, seed=0, device="cpu", batch_size=2)
    assert probe.source == "calibration" and torch.equal(probe.ids, calib[:4])


def test_lora_adapter_input_is_sampled_as_its_merged_model(tiny_pair, tmp_path):
    """A LoRA fine-tune samples from base + BA: the same sequences as its merged checkpoint."""
    peft = pytest.importorskip("peft")
    base, _ = tiny_pair("llama")
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p, generator=torch.Generator().manual_seed(1)) * 0.5)
    lora.save_pretrained(tmp_path / "adapter")
    merged = lora.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    reader = LoraFinetunedReader(CheckpointReader(base), tmp_path / "adapter")
    got = ep.sample_fine_tune(reader, 3, 10, seed=0, device=torch.device("cpu"))
    want = ep.sample_fine_tune(CheckpointReader(tmp_path / "merged"), 3, 10, seed=0, device=torch.device("cpu"))
    assert got is not None and torch.equal(got, want)


def test_long_windows_pack_samples(tiny_pair, monkeypatch):
    """A window longer than SAMPLE_TOKENS holds several samples back to back, each from the start token."""
    _, ft = tiny_pair("llama")
    reader = CheckpointReader(ft)
    monkeypatch.setattr(ep, "SAMPLE_TOKENS", 5)
    ids = ep.sample_fine_tune(reader, 2, 13, seed=0, device=torch.device("cpu"))
    bos = reader.config.bos_token_id
    assert ids.shape == (2, 13)
    assert bool((ids[:, [0, 5, 10]] == bos).all())
    assert not bool((ids[:, [1, 2, 3, 4, 6, 7, 8, 9, 11, 12]] == bos).all())
