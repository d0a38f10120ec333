"""More architectures end to end: Gemma-2, Gemma-3, Phi-3 (fused qkv / gate_up), Mixtral and Qwen2-MoE (fused
3-D experts, per-expert Hessians), LLaVA and Qwen2-VL (vision towers carried / left as they are); clear
refusals otherwise."""

from __future__ import annotations

import pytest
import torch

from fixtures.more_architectures import MoreArchitectures, model_class
from prinmix import api
from prinmix.api import CalibrationConfig
from prinmix.calibration.decoder_stack import DecoderStack
from prinmix.calibration.expert_hessians import regularised
from prinmix.calibration.hessians import capture_hessians
from prinmix.calibration.layer_inputs import run_layer
from prinmix.checkpoint.reader import CheckpointReader
from prinmix.errors import CheckpointError

FAST = dict(calibration=CalibrationConfig(nsamples=8, seqlen=48))
# Compressed matrices each family must have (checkpoint names in layer 0), beyond q/k/v/o.
EXPECTED = {
    "gemma3_text": ["mlp.gate_proj", "mlp.down_proj"],
    "phi3": ["self_attn.qkv_proj", "mlp.gate_up_proj", "mlp.down_proj"],
    "mixtral": [f"block_sparse_moe.experts.{e}.{w}" for e in range(4) for w in ("w1", "w2", "w3")],
    "qwen2_moe": [f"mlp.experts.{e}.{w}_proj" for e in range(4) for w in ("gate", "up", "down")]
    + ["mlp.shared_expert.gate_proj", "mlp.shared_expert.down_proj"],
    "llava": ["mlp.gate_proj", "mlp.up_proj", "self_attn.q_proj"],
    "gemma2": ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"],
    "qwen2_vl": ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"],
}


@pytest.fixture(scope="session")
def more_pair(tiny_models):
    return MoreArchitectures(tiny_models).pair


def _logits(family, path, ids):
    model = model_class(family).from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("family", list(EXPECTED))
def test_compress_merge(more_pair, tmp_path, family):
    base, ft = more_pair(family)
    delta_path = tmp_path / "d.delta"
    # exact_embeddings: this checks each architecture's linears; the toy fp32 norms alone would take most of a
    # whole-delta budget (tests/test_whole_delta.py covers that mode)
    summary = api.compress(base, ft, delta_path, ratio="1/16", exact_embeddings=True, **FAST)
    delta = api.load_delta(delta_path)
    prefix = "language_model.model.layers.0." if family == "llava" else "model.layers.0."
    for name in EXPECTED[family]:
        assert prefix + name + ".weight" in delta.matrices, name
    assert summary.ratio_achieved <= 1 / 16
    if family == "llava":  # the fine-tune nudged the vision projector: carried exactly
        vision = [n for n in delta.dense if n.startswith("multi_modal_projector.")]
        assert vision == ["multi_modal_projector.linear_1.weight"]
        assert not any(n.startswith("language_model.model.layers") for n in delta.dense if n.endswith("proj.weight"))
    merged = api.merge(base, delta_path, tmp_path / "merged")
    if family == "llava":
        name = "multi_modal_projector.linear_1.weight"
        assert torch.equal(CheckpointReader(merged).get(name), CheckpointReader(ft).get(name))
    ids = torch.randint(3, 400, (3, 40), generator=torch.Generator().manual_seed(2))
    lb, lf, lm = (_logits(family, p, ids) for p in (base, ft, merged))
    ratio = float((lm - lf).norm() / (lb - lf).norm())
    assert ratio < 0.4, ratio


@pytest.mark.parametrize("family", ["mixtral", "llava"])
def test_layer_by_layer_matches_the_full_model(more_pair, family):
    """Fused experts / renamed towers are assembled right: stack logits == transformers' own forward."""
    ft = more_pair(family)[1]
    reader = CheckpointReader(ft)
    stack = DecoderStack(reader)
    ids = torch.randint(3, 400, (3, 20), generator=torch.Generator().manual_seed(3))
    inputs = stack.embed(reader, ids)
    for i in range(stack.num_layers):
        layer = stack.build_layer(i, stack.read_layer_state(reader, i))
        inputs = inputs.with_hidden(run_layer(layer, inputs))
    ours = stack.logits(reader, ids, inputs.hidden)
    assert torch.allclose(ours, _logits(family, ft, ids), atol=2e-4)


def test_expert_hessians_are_over_routed_tokens(more_pair):
    """Qwen2-MoE: the shared expert sees every token once, the routed experts top_k times in total,
    so Σ_e H_e(gate/up of expert e) = top_k · H(shared_expert.gate_proj) (off the diagonal, which damping of
    few-token experts raises); each expert's H is its own, shared by its gate and up matrices."""
    reader = CheckpointReader(more_pair("qwen2_moe")[1])
    stack = DecoderStack(reader)
    inputs = stack.embed(reader, torch.randint(3, 400, (16, 48), generator=torch.Generator().manual_seed(4)))
    for i in range(stack.num_layers):
        layer = stack.build_layer(i, stack.read_layer_state(reader, i))
        stats, hidden = capture_hessians(layer, inputs, return_outputs=True)
        assert set(stack.linear_names(i)) >= set(stats)
        shared = stats["mlp.shared_expert.gate_proj"].H.double()
        zero = torch.zeros_like(shared)                          # an expert no token was routed to has no H
        experts = [stats[f"mlp.experts.{e}.gate_proj"].H.double() if f"mlp.experts.{e}.gate_proj" in stats else zero
                   for e in range(4)]
        for e in range(4):
            assert stats.get(f"mlp.experts.{e}.up_proj") is stats.get(f"mlp.experts.{e}.gate_proj")
            if f"mlp.experts.{e}.down_proj" in stats:
                assert stats[f"mlp.experts.{e}.down_proj"].H.shape == (48, 48)
        total, off = sum(experts), ~torch.eye(shared.shape[0], dtype=torch.bool)
        tol = 1e-4 * float(shared.diagonal().mean())
        assert torch.allclose(total[off], 2 * shared[off], rtol=1e-5, atol=tol)
        assert bool((total.diagonal() >= 2 * shared.diagonal() - tol).all())
        assert sum(bool(e.trace() > 0) for e in experts) >= 2
        inputs = inputs.with_hidden(hidden)


def test_few_token_experts_are_damped():
    x = torch.randn(3, 8, dtype=torch.float64)
    H = x.T @ x
    assert regularised(H, 0) is None
    damped = regularised(H, 3)
    assert torch.allclose(damped - H, (1 - 3 / 8) * H.diagonal().mean() * torch.eye(8, dtype=torch.float64))
    assert bool(torch.linalg.eigvalsh(damped).min() > 0)
    assert regularised(H, 8) is H


def test_unsupported_architectures_are_named(tmp_path, tiny_pair):
    import transformers as T

    base, ft = tiny_pair("llama", "fp32")
    gpt_oss = T.GptOssConfig(vocab_size=512, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                             num_experts_per_tok=2, layer_types=["sliding_attention", "full_attention"])
    t5 = T.T5Config(vocab_size=512, d_model=32, d_ff=64, num_layers=2, num_heads=2, d_kv=16)
    for name, config, cls, message in [
        ("gpt_oss", gpt_oss, T.AutoModelForCausalLM, "model_type 'gpt_oss' stores experts as one fused 3-D tensor"),
        ("t5", t5, T.T5ForConditionalGeneration, "unsupported architecture: model_type 't5'"),
    ]:
        torch.manual_seed(0)
        model = cls.from_config(config) if cls is T.AutoModelForCausalLM else cls(config)
        model.save_pretrained(tmp_path / name / "a")
        model.save_pretrained(tmp_path / name / "b")
        with pytest.raises(CheckpointError, match=message):
            api.compress(tmp_path / name / "a", tmp_path / name / "b", tmp_path / f"{name}.delta", **FAST)
