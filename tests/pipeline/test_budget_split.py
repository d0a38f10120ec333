"""How the whole-delta budget is shared between the decoder linears and the vocabulary rows (budget_split.py):
proportional by default; the exchange rule follows the parts' error curves (cheap parts give bits away), is
the optimum of Σ w_p·e_p on a brute-force grid of shares, and measures its weights on a probe; a forced share
is honoured, and the whole file stays within α either way."""

import math
import shutil
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from prinmix import api
from prinmix.algorithms.budget import prinmix_fixed_overhead_bits
from prinmix.algorithms.prinmix_config import PrinMixConfig
from prinmix.calibration.decoder_stack import DecoderStack
from prinmix.errors import BudgetError
from prinmix.format.delta_file import matrix_header_bytes, ratio_within_file
from prinmix.pipeline import budget_split
from prinmix.pipeline.budget_split import (
    EffectProbe,
    _final_hidden,
    _linear_group_curve,
    _logit_error,
    _PerturbedReader,
    _truncation_residual,
    _vocab_curve,
    sample_layers,
)
from prinmix.pipeline.compress import open_pair
from prinmix.pipeline.whole_budget import plan_whole_budget


def _pair(root, tokenizer_dir, vocab, linear_rank, embed_rank, seed=0):
    """A random tied Llama base and a 'fine-tune': every linear changed by a rank-`linear_rank` delta, every
    embedding row by a rank-`embed_rank` delta (full rank = Gaussian noise), of similar norms."""
    g = torch.Generator().manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      max_position_embeddings=128)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    base, ft = root / "base", root / "finetuned"
    model.save_pretrained(base)

    def low_rank(shape, r):
        u, v = torch.randn(shape[0], r, generator=g), torch.randn(r, shape[1], generator=g)
        d = u @ v
        return 0.02 * d / d.norm() * math.sqrt(d.numel())

    with torch.no_grad():
        for n, p in model.named_parameters():
            if "embed" in n:
                p += low_rank(p.shape, embed_rank)
            elif p.ndim == 2:
                p += low_rank(p.shape, linear_rank)
    model.save_pretrained(ft)
    for d in (base, ft):
        for item in tokenizer_dir.iterdir():
            shutil.copy2(item, d / item.name)
    return base, ft


def _plan(base, ft, alpha, vocab_share=None, split="exchange", probe=None):
    b, f, compat = open_pair(base, ft, None, None)
    stack = DecoderStack(f)
    plan = plan_whole_budget(stack, b, f, compat, alpha, "prinmix", PrinMixConfig(), None, vocab_share, probe, split)
    return plan, stack, b, f


def test_sample_layers_spread_over_depth():
    assert sample_layers(3) == [0, 1, 2]
    assert sample_layers(30) == [0, 10, 19, 29]
    for n in range(1, 80):
        got = sample_layers(n)
        assert got == sorted(set(got)) and got[0] == 0 and got[-1] == n - 1 and len(got) == min(n, 4)


@pytest.mark.parametrize("linear_rank,embed_rank,more", [(64, 1, False), (1, 64, True)])
def test_split_follows_the_error_curves(tiny_models, tmp_path, linear_rank, embed_rank, more):
    """A rank-1 embedding delta is captured with few bits: it gets less than its proportional share; a
    full-rank one beside rank-1 linears gets more."""
    base, ft = _pair(tmp_path, tiny_models.tokenizer_dir, len(tiny_models.tokenizer), linear_rank, embed_rank)
    plan, *_ = _plan(base, ft, 1 / 16)
    proportional = plan.vocab_params / (plan.vocab_params + plan.linear_params)
    assert plan.split.rule == "exchange"
    assert (plan.split.vocab_share > 1.5 * proportional) if more else (plan.split.vocab_share < proportional / 1.5)
    assert plan.linear_alpha == pytest.approx(plan.split.linear_bits / (16 * plan.linear_params))


def test_split_is_the_optimum_over_shares(tiny_models, tmp_path):
    """Σ n_p·e_p at the chosen split ≤ its value at every share of a brute-force grid (+ the grid's step)."""
    base, ft = _pair(tmp_path, tiny_models.tokenizer_dir, len(tiny_models.tokenizer), 8, 8, seed=1)
    plan, stack, b, f = _plan(base, ft, 1 / 32)
    entries = plan.linear_params + plan.vocab_params
    shared = plan.split.compressed_bits - prinmix_fixed_overhead_bits(PrinMixConfig().fmax)  # less the floor
    lin = _linear_group_curve(stack, b, f, plan.linear_params, shared, PrinMixConfig(), {})
    voc = _vocab_curve(plan.vocab[0], b, f, None, None, shared, PrinMixConfig())
    w_lin, w_voc = plan.linear_params / entries, plan.vocab_params / entries   # no probe: weights n_p

    def objective(linear_bits):
        return float(w_lin * lin([linear_bits])[0] + w_voc * voc([shared - linear_bits])[0])

    chosen = objective(plan.split.linear_bits)
    grid = [objective(shared * j / 64) for j in range(65)]
    assert chosen <= min(grid) + 0.02 * (max(grid) - min(grid))


def test_forced_share_and_the_whole_file_stays_within_alpha(tiny_models, tmp_path):
    base, ft = _pair(tmp_path, tiny_models.tokenizer_dir, len(tiny_models.tokenizer), 4, 4, seed=2)
    vocab_bytes = {}
    for share in (0.0, 0.6):
        plan, *_ = _plan(base, ft, 1 / 16, vocab_share=share, split="proportional")
        assert plan.split.rule == "fixed share" and plan.split.vocab_share == share
        assert plan.split.linear_bits == int(plan.split.compressed_bits * (1 - share))
        path = tmp_path / f"d{share}.delta"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # the toy model's uncharged header entries (decision 5)
            s = api.compress(base, ft, path, ratio="1/16", device="cpu", vocab_share=share,
                             calibration=api.CalibrationConfig(nsamples=4, seqlen=32))
        delta = api.load_delta(path)
        assert delta.stats["whole"]["split"] == {"rule": "fixed share", "vocab_share": share}
        vocab_bytes[share] = sum(s.weight_bytes["vocab"].values())
        # the whole budget holds (toy matrices' header entries excepted: whole_budget.py decision 1)
        exempt = sum(matrix_header_bytes(n, m.shape) for n, m in delta.matrices.items()
                     if ratio_within_file(1 / 16, n, m.shape) == 1 / 16)
        assert s.weight_bytes["total"] <= math.floor(s.whole_params) // 8 + exempt
    # share 0: the rows get only what the linears left unspent
    assert vocab_bytes[0.0] < vocab_bytes[0.6] / 4


def test_default_is_proportional_and_the_probe_weighs_the_head(tiny_models, tmp_path):
    base, ft = _pair(tmp_path, tiny_models.tokenizer_dir, len(tiny_models.tokenizer), 4, 4, seed=3)
    plan, *_ = _plan(base, ft, 1 / 16, split="proportional")
    assert plan.split.rule == "proportional"
    assert plan.split.vocab_share == pytest.approx(plan.vocab_params / (plan.vocab_params + plan.linear_params))
    ids = torch.randint(3, len(tiny_models.tokenizer), (8, 32), generator=torch.Generator().manual_seed(0))
    probe = EffectProbe(ids)
    plan, *_ = _plan(base, ft, 1 / 16, probe=probe)
    assert plan.split.rule == "exchange" and set(plan.split.weights) == {"linears", "model.embed_tokens.weight"}
    assert all(w > 0 and math.isfinite(w) for w in plan.split.weights.values())


def test_sensitivity_is_the_logit_change_per_unit_of_objective(tiny_models, tmp_path, monkeypatch):
    """The logit change per unit of objective is a property of the part (first order): halving a small residual
    quarters the logit change as it quarters J (the linearisation _sensitivity_weights relies on; tied embedding)."""
    base, ft = _pair(tmp_path, tiny_models.tokenizer_dir, len(tiny_models.tokenizer), 4, 4, seed=4)
    b, f, compat = open_pair(base, ft, None, None)
    stack = DecoderStack(f)
    ids = torch.randint(3, len(tiny_models.tokenizer), (8, 32), generator=torch.Generator().manual_seed(1))
    name = "model.embed_tokens.weight"
    d = f.get(name, dtype=torch.float32) - b.get(name, dtype=torch.float32)
    R = _truncation_residual(d, 1 / 16)
    assert torch.linalg.matrix_rank(d - R) == int(1 / 16 * d.shape[0] * d.shape[1] / sum(d.shape))
    monkeypatch.setattr(budget_split, "LOGIT_CHUNK_BYTES", 1)   # one sequence per chunk
    h = _final_hidden(stack, f, ids, "cpu", 8)
    z = stack.logits(f, ids, h, "cpu", 8)

    def change(scale):
        rows = torch.arange(d.shape[0])
        reader = _PerturbedReader(f, {name: (rows, -scale * R)})
        h2 = _final_hidden(stack, reader, ids, "cpu", 8)
        direct = float(((stack.logits(reader, ids, h2, "cpu", 8) - z) ** 2).sum(-1).mean())
        chunked = _logit_error(stack, ids, (f, h), (reader, h2), "cpu", 8)   # the probe's chunked form
        assert chunked == pytest.approx(direct, rel=1e-5)
        return chunked

    full, half = change(0.2), change(0.1)
    assert full > 0 and half == pytest.approx(full / 4, rel=0.15)


def test_vocab_share_out_of_range_is_refused(tiny_pair, tmp_path):
    base, ft = tiny_pair("llama")
    with pytest.raises(BudgetError, match="vocab_share"):
        api.compress(base, ft, tmp_path / "x.delta", vocab_share=1.5)
