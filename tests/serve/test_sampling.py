"""serve/sampling.py against float64 references: the top-k / top-p masks, greedy limits, seeded draws."""

import math

import pytest
import torch

from prinmix.serve.sampling import (
    SamplingParams,
    choose_tokens,
    filter_logits,
    new_generator,
)


def _reference_keep(logits: list[float], temperature: float, top_k: int, top_p: float) -> set[int]:
    """Kept token ids by the definitions, in float64 Python: the top_k largest, then the shortest
    most-likely-first prefix whose probability mass reaches top_p (renormalised after top-k)."""
    order = sorted(range(len(logits)), key=lambda i: -logits[i])
    if top_k > 0:
        order = order[:top_k]
    scaled = [logits[i] / temperature for i in order]
    peak = max(scaled)
    weights = [math.exp(x - peak) for x in scaled]
    total = sum(weights)
    kept, mass = [], 0.0
    for i, w in zip(order, weights):
        if kept and mass >= top_p:
            break
        kept.append(i)
        mass += w / total
    return set(kept)


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (1.0, 3, 1.0), (0.7, 0, 0.5), (1.3, 5, 0.8),
                                                        (1.0, 0, 0.95), (0.5, 2, 0.3), (2.0, 0, 0.999)])
def test_filter_keeps_the_reference_set(temperature, top_k, top_p):
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 50, generator=gen, dtype=torch.float64) * 3
    out = filter_logits(logits.float(), torch.full((4,), temperature), torch.full((4,), top_k),
                        torch.full((4,), top_p))
    for row in range(4):
        kept = {i for i in range(50) if out[row, i] > float("-inf")}
        assert kept == _reference_keep(logits[row].tolist(), temperature, top_k, top_p)
        finite = out[row][out[row] > float("-inf")].double()
        assert torch.allclose(finite, logits[row][sorted(kept)] / temperature, rtol=1e-5)


def test_filter_mixes_settings_per_row():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]] * 3)
    out = filter_logits(logits, torch.tensor([1.0, 1.0, 1.0]), torch.tensor([2, 0, 0]), torch.tensor([1.0, 1.0, 0.5]))
    assert (out > float("-inf")).tolist() == [[True, True, False, False, False], [True] * 5,
                                              [True, False, False, False, False]]


def test_top_k_1_and_tiny_temperature_equal_greedy():
    logits = torch.randn(6, 40, generator=torch.Generator().manual_seed(0)) * 2
    greedy = logits.argmax(-1).tolist()
    for params in (SamplingParams(temperature=1.0, top_k=1, seed=1), SamplingParams(temperature=1e-4, seed=1),
                   SamplingParams(temperature=0.0)):
        tokens, _ = choose_tokens(logits, [params] * 6, [new_generator(params, "cpu") for _ in range(6)])
        assert tokens == greedy


def test_seeded_draw_does_not_depend_on_batch_companions():
    gen = torch.Generator().manual_seed(5)
    mine = torch.randn(64, generator=gen)
    others = torch.randn(3, 64, generator=gen)
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234)
    alone = []
    g = new_generator(params, "cpu")
    for _ in range(20):
        alone += choose_tokens(mine[None], [params], [g])[0]
    batched = []
    g = new_generator(params, "cpu")
    companions = [SamplingParams(temperature=0.8, seed=7), SamplingParams(), SamplingParams(temperature=1.5, top_k=4)]
    gens = [new_generator(c, "cpu") for c in companions]
    for _ in range(20):
        tokens, _ = choose_tokens(torch.cat([others[:1], mine[None], others[1:]]),
                                  [companions[0], params, *companions[1:]], [gens[0], g, *gens[1:]])
        batched.append(tokens[1])
    assert alone == batched and len(set(alone)) > 1            # reproducible, and really sampled


def test_sampled_frequencies_follow_the_filtered_distribution():
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.0, -1.0]])
    params = SamplingParams(temperature=0.8, top_k=4, top_p=0.9, seed=0)
    keep = _reference_keep(logits[0].tolist(), 0.8, 4, 0.9)
    weights = {i: math.exp(logits[0, i].item() / 0.8) for i in keep}
    probs = {i: w / sum(weights.values()) for i, w in weights.items()}
    g, draws = new_generator(params, "cpu"), 4000
    counts = torch.zeros(5)
    for _ in range(draws):
        counts[choose_tokens(logits, [params], [g])[0][0]] += 1
    for i in range(5):
        expected = probs.get(i, 0.0)
        assert abs(counts[i].item() / draws - expected) < 4 * math.sqrt(expected * (1 - expected) / draws) + 1e-9


def test_logprobs_are_the_raw_distribution():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.5]])
    tokens, entries = choose_tokens(logits, [SamplingParams(logprobs=2)], [None])
    ref = torch.log_softmax(logits.double(), -1)[0]
    assert tokens == [1] and entries[0].token == 1 and entries[0].logprob == pytest.approx(ref[1].item(), abs=1e-6)
    assert [t for t, _ in entries[0].top] == [1, 2]
    assert [lp for _, lp in entries[0].top] == pytest.approx([ref[1].item(), ref[2].item()], abs=1e-6)
