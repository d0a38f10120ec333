"""How the whole-delta budget is shared between the decoder linears and the vocabulary rows (budget_split.py):
proportional by default; the measured rule's effects are the KL divergences a plain transformers forward gives
for the same perturbed fine-tune, its split is the optimum of their sum on a brute-force grid, a forced share is
honoured, and the whole file stays within α either way."""

import math
import shutil
import warnings

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from prinmix import api
from prinmix.algorithms.compress_matrix import compress_matrix
from prinmix.algorithms.prinmix_config import PrinMixConfig
from prinmix.calibration.decoder_stack import DecoderStack
from prinmix.errors import BudgetError
from prinmix.format.delta_file import matrix_header_bytes, ratio_within_file
from prinmix.pipeline import budget_split
from prinmix.pipeline.budget_split import (
    EffectProbe,
    _effect_curve,
    _final_hidden,
    _kl_divergence,
    _measured_effects,
    _PerturbedReader,
    _residuals,
    sample_layers,
    vocab_problem,
)
from prinmix.pipeline.compress import open_pair
from prinmix.pipeline.whole_budget import plan_whole_budget


def _pair(root, tokenizer_dir, vocab, linear_rank, embed_rank, seed=0, tied=True):
    """A random Llama base and a 'fine-tune': every linear changed by a rank-`linear_rank` delta, every
    embedding (and untied lm_head) row by a rank-`embed_rank` delta (full rank = Gaussian noise), of similar
    norms."""
    g = torch.Generator().manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied,
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
            if "embed" in n or "lm_head" in n:
                p += low_rank(p.shape, embed_rank)
            elif p.ndim == 2:
                p += low_rank(p.shape, linear_rank)
    model.save_pretrained(ft)
    for d in (base, ft):
        for item in tokenizer_dir.iterdir():
            shutil.copy2(item, d / item.name)
    return base, ft


def _plan(base, ft, alpha, vocab_share=None, split="measured", probe=None, counts=None):
    b, f, compat = open_pair(base, ft, None, None)
    stack = DecoderStack(f)
    plan = plan_whole_budget(stack, b, f, compat, alpha, "prinmix", PrinMixConfig(), counts, vocab_share, probe,
                             split)
    return plan, stack, b, f


def _ids(vocab, seed=0, n=budget_split.EFFECT_SEQUENCES, seq=32):
    return torch.randint(3, vocab, (n, seq), generator=torch.Generator().manual_seed(seed))


def _hf_kl(ft_dir, ids, edit) -> float:
    """Mean KL(p_ft ‖ p_edited) nats/token by plain transformers forwards; edit(model) changes the weights."""
    model = AutoModelForCausalLM.from_pretrained(ft_dir, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        log_p = torch.log_softmax(model(input_ids=ids).logits.double(), -1)
        edit(model)
        log_q = torch.log_softmax(model(input_ids=ids).logits.double(), -1)
    return float((log_p.exp() * (log_p - log_q)).sum(-1).mean())


def test_sample_layers_spread_over_depth():
    assert sample_layers(3) == [0, 1, 2]
    assert sample_layers(30) == [0, 10, 19, 29]
    for n in range(1, 80):
        got = sample_layers(n)
        assert got == sorted(set(got)) and got[0] == 0 and got[-1] == n - 1 and len(got) == min(n, 4)


def test_effect_curve_interpolates_in_log_and_is_flat_outside():
    f = _effect_curve([(100, 0.01), (0, 1.0), (50, 0.1)])
    assert np.allclose(f([0, 50, 100]), [1.0, 0.1, 0.01])
    assert f([25])[0] == pytest.approx(math.sqrt(1.0 * 0.1))      # geometric mean half-way
    assert f([1000])[0] == pytest.approx(0.01) and f([-5])[0] == pytest.approx(1.0)


def test_kl_divergence_chunked_equals_a_transformers_forward(tiny_models, tmp_path, monkeypatch):
    """_kl_divergence on the streamed stack (one sequence per chunk) = KL of two plain HF forwards."""
    base, ft = _pair(tmp_path, tiny_models.tokenizer_dir, len(tiny_models.tokenizer), 4, 4, seed=4)
    b, f, _ = open_pair(base, ft, None, None)
    stack = DecoderStack(f)
    ids = _ids(len(tiny_models.tokenizer), 1)
    name = "model.layers.1.mlp.down_proj.weight"
    offset = 0.05 * torch.randn(f.shape(name), generator=torch.Generator().manual_seed(2))
    monkeypatch.setattr(budget_split, "LOGIT_CHUNK_BYTES", 1)
    reader = _PerturbedReader(f, {name: (None, offset)})
    got = _kl_divergence(stack, ids, (f, _final_hidden(stack, f, ids, "cpu", 8)),
                         (reader, _final_hidden(stack, reader, ids, "cpu", 8)), "cpu", 8)

    def edit(model):
        model.model.layers[1].mlp.down_proj.weight += offset
    assert got > 0 and got == pytest.approx(_hf_kl(ft, ids, edit), rel=1e-3)


@pytest.mark.parametrize("tied", [True, False])
def test_measured_effects_are_the_kl_of_the_perturbed_fine_tune(tiny_models, tmp_path, tied):
    """Each measured point = the KL a transformers forward gives for the fine-tune with that part compressed
    (its residual from compress_matrix at those bits; the sampled linears scaled to all layers), or dropped at 0
    bits; more bits, less KL."""
    base, ft = _pair(tmp_path, tiny_models.tokenizer_dir, len(tiny_models.tokenizer), 4, 8, seed=5, tied=tied)
    ids = _ids(len(tiny_models.tokenizer), 2)
    plan, stack, b, f = _plan(base, ft, 1 / 8, split="proportional")
    todo = [p for p in plan.vocab if p.changed.numel()]
    assert len(todo) == (1 if tied else 2)
    big = 16 * 64 * 64
    effects = _measured_effects(stack, b, f, todo, [0, big * 4], [[0, big] for _ in todo], plan.linear_params,
                                PrinMixConfig(), None, EffectProbe(ids))
    layers = sample_layers(stack.num_layers)
    assert layers == [0, 1, 2]   # every layer sampled: scale 1

    def revert_linears(model):
        for i in layers:
            for n, m in model.model.layers[i].named_modules():
                if isinstance(m, torch.nn.Linear):
                    m.weight.copy_(b.get(f"model.layers.{i}.{n}.weight", dtype=torch.float32))
    assert effects["linears"][0][1] == pytest.approx(_hf_kl(ft, ids, revert_linears), rel=1e-3)
    for part in todo:
        (b0, e0), (b1, e1) = effects[part.name]
        d_rows, H, w = vocab_problem(part, b, f, None, None)

        def revert_rows(model, part=part):
            m = model.lm_head if part.name == "lm_head.weight" else model.model.embed_tokens
            m.weight[part.changed] = b.get(part.name, dtype=torch.float32)[part.changed]
        assert b0 == 0 and e0 == pytest.approx(_hf_kl(ft, ids, revert_rows), rel=1e-3)
        assert 0 <= e1 < e0 / 4
    # each point's residual is compress_matrix's reconstruction error at its bits (one analysis shared by
    # all budgets gives the same blobs as separate compressions), row-weighted or not; dropped at 0 bits
    d_rows, _, _ = vocab_problem(todo[0], b, f, None, None)
    weights = torch.rand(d_rows.shape[0], generator=torch.Generator().manual_seed(0)) * 5
    points = [0, big // 8, big // 2, big]
    for w in (None, weights):
        got = _residuals(d_rows, None, w, points, PrinMixConfig(), "cpu")
        assert torch.equal(got[0], -d_rows)
        for bits, r in zip(points[1:], got[1:]):
            c = compress_matrix(d_rows, None, (bits - 1) / (16 * d_rows.numel()), "prinmix", PrinMixConfig(),
                                row_weights=w)
            assert torch.equal(r, c.reconstruct() - d_rows)


def test_measured_split_is_the_optimum_of_the_measured_curves(tiny_models, tmp_path):
    """The chosen split minimises Σ_p E_p(B_p) over a brute-force grid of shares (within the grid's step), and
    the vocabulary parts' bits are recorded for compress_vocab_parts."""
    base, ft = _pair(tmp_path, tiny_models.tokenizer_dir, len(tiny_models.tokenizer), 8, 8, seed=1)
    plan, *_ = _plan(base, ft, 1 / 16, probe=EffectProbe(_ids(len(tiny_models.tokenizer), 3)))
    s = plan.split
    assert s.rule == "measured" and set(s.effects) == {"linears", "model.embed_tokens.weight"}
    lin, voc = (_effect_curve(s.effects[n]) for n in ("linears", "model.embed_tokens.weight"))
    shared = s.linear_bits + (s.part_bits["model.embed_tokens.weight"] - budget_split.prinmix_fixed_overhead_bits(
        PrinMixConfig().fmax))
    assert shared <= s.compressed_bits

    def total(linear_bits):
        return float(lin([linear_bits])[0] + voc([shared - linear_bits])[0])
    grid = [total(shared * j / 256) for j in range(257)]
    assert total(s.linear_bits) <= min(grid) + 0.02 * (max(grid) - min(grid))
    assert plan.linear_alpha == pytest.approx(s.linear_bits / (16 * plan.linear_params))


@pytest.mark.parametrize("linear_rank,embed_rank,more", [(64, 1, False), (1, 64, True)])
def test_measured_split_follows_what_the_parts_cost(tiny_models, tmp_path, linear_rank, embed_rank, more):
    """A rank-1 embedding delta beside full-rank linears is captured with few bits: it gets less than its
    proportional share; a full-rank one beside rank-1 linears gets more."""
    base, ft = _pair(tmp_path, tiny_models.tokenizer_dir, len(tiny_models.tokenizer), linear_rank, embed_rank)
    plan, *_ = _plan(base, ft, 1 / 16, probe=EffectProbe(_ids(len(tiny_models.tokenizer), 4)))
    proportional = plan.vocab_params / (plan.vocab_params + plan.linear_params)
    assert plan.split.rule == "measured"
    assert (plan.split.vocab_share > 1.5 * proportional) if more else (plan.split.vocab_share < proportional / 1.5)


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
        split = delta.stats["whole"]["split"]
        assert split["rule"] == "fixed share" and split["vocab_share"] == share
        assert s.split == split and split["proportional_share"] == pytest.approx(
            plan.vocab_params / (plan.vocab_params + plan.linear_params))
        vocab_bytes[share] = sum(s.weight_bytes["vocab"].values())
        # the whole budget holds (toy matrices' header entries excepted: whole_budget.py decision 1)
        exempt = sum(matrix_header_bytes(n, m.shape) for n, m in delta.matrices.items()
                     if ratio_within_file(1 / 16, n, m.shape) == 1 / 16)
        assert s.weight_bytes["total"] <= math.floor(s.whole_params) // 8 + exempt
    # share 0: the rows get only what the linears left unspent
    assert vocab_bytes[0.0] < vocab_bytes[0.6] / 4


def test_default_is_proportional_and_measured_needs_a_probe(tiny_models, tmp_path):
    base, ft = _pair(tmp_path, tiny_models.tokenizer_dir, len(tiny_models.tokenizer), 4, 4, seed=3)
    for split in ("proportional", "measured"):   # no probe: nothing to measure on
        plan, *_ = _plan(base, ft, 1 / 16, split=split)
        assert plan.split.rule == "proportional"
        assert plan.split.vocab_share == pytest.approx(plan.vocab_params / (plan.vocab_params + plan.linear_params))


def test_untied_measured_split_end_to_end_within_alpha(tiny_models, tmp_path):
    """--split measured on an untied pair: the embedding and lm_head get the measured bits' proportions, the
    file records the effects, and the whole delta stays within α."""
    base, ft = _pair(tmp_path, tiny_models.tokenizer_dir, len(tiny_models.tokenizer), 4, 16, seed=6, tied=False)
    path = tmp_path / "m.delta"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # the toy model's uncharged header entries (whole_budget decision 1)
        s = api.compress(base, ft, path, ratio="1/16", device="cpu", split="measured",
                         calibration=api.CalibrationConfig(nsamples=8, seqlen=32))
    delta = api.load_delta(path)
    split = delta.stats["whole"]["split"]
    assert split["rule"] == "measured"
    assert set(split["effects"]) == {"linears", "model.embed_tokens.weight", "lm_head.weight"}
    exempt = sum(matrix_header_bytes(n, m.shape) for n, m in delta.matrices.items()
                 if ratio_within_file(1 / 16, n, m.shape) == 1 / 16)
    assert s.weight_bytes["total"] <= math.floor(s.whole_params) // 8 + exempt
    assert set(delta.vocab) == {"model.embed_tokens.weight", "lm_head.weight"}


def test_vocab_share_out_of_range_is_refused(tiny_pair, tmp_path):
    base, ft = tiny_pair("llama")
    with pytest.raises(BudgetError, match="vocab_share"):
        api.compress(base, ft, tmp_path / "x.delta", vocab_share=1.5)


def test_a_whole_ratio_that_leaves_a_linear_no_blob_is_refused_before_any_work(tiny_pair):
    """At whole 1/64 the tiny fine-tune's exact norms (2 KB in bfloat16) and header entries leave the linears too few bits
    for the smallest matrix's blob header: one BudgetError naming it, not a failure deep in the layer pass."""
    base, ft = tiny_pair("llama", "bf16")
    with pytest.raises(BudgetError, match=r"k_proj.weight 32x64, less than a blob's .* choose a larger --ratio"):
        _plan(base, ft, 1 / 64, split="proportional")
    plan, *_ = _plan(base, ft, 1 / 16, split="proportional")   # a ratio that fits plans
    assert plan.linear_alpha > 0
