"""DecoderStack: generic layer discovery, input capture, layer-by-layer forward (layer_inputs.run_layer)."""

from __future__ import annotations

import pytest
import torch

from fixtures.decoder_inputs import FAMILIES, LINEARS, N_SEQ, SEQ_LEN, calibration_ids, full_model
from prinmix.calibration.decoder_stack import DecoderStack
from prinmix.calibration.hessians import capture_hessians
from prinmix.calibration.layer_inputs import LayerInputs, PerBatch, run_layer
from prinmix.checkpoint.reader import CheckpointReader
from prinmix.errors import CheckpointError


def run_all_layers(stack: DecoderStack, reader: CheckpointReader, inputs: LayerInputs, batch_size: int = 3):
    for i in range(stack.num_layers):
        layer = stack.build_layer(i, stack.read_layer_state(reader, i))
        inputs = inputs.with_hidden(run_layer(layer, inputs, batch_size=batch_size))
    return inputs


def test_structure(tiny_pair):
    reader = CheckpointReader(tiny_pair("qwen2", "float32")[1])
    stack = DecoderStack(reader)
    assert stack.num_layers == 3 and stack.layers_path == "model.layers"
    assert stack.layer_class.__name__ == "Qwen2DecoderLayer"
    assert stack.layer_prefix(2) == "model.layers.2."
    assert stack.linear_names(0) == LINEARS
    names = stack.layer_tensor_names(1)
    assert all(n.startswith("model.layers.1.") for n in names)
    assert "model.layers.1.self_attn.q_proj.bias" in names  # qwen2 has q/k/v biases
    assert len(names) == 7 + 3 + 2  # linear weights, q/k/v biases, two norms
    assert stack.non_layer_tensor_names == ["model.embed_tokens.weight", "model.norm.weight"]
    all_names = set(stack.non_layer_tensor_names).union(*(stack.layer_tensor_names(i) for i in range(3)))
    assert all_names == set(reader.tensor_names)
    with pytest.raises(IndexError):
        stack.layer_prefix(3)


def test_skeleton_holds_no_weights(tiny_pair):
    stack = DecoderStack(CheckpointReader(tiny_pair("llama", "float32")[0]))
    assert all(p.is_meta for p in stack._skeleton.parameters())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_layer_by_layer_reproduces_full_model_logits(tiny_pair, family, dtype):
    path = tiny_pair(family, dtype)[1]
    reader = CheckpointReader(path)
    stack = DecoderStack(reader)
    ids = calibration_ids()
    inputs = stack.embed(reader, ids, "cpu", batch_size=2)
    assert inputs.hidden.shape == (N_SEQ, SEQ_LEN, 64) and inputs.hidden.dtype == torch.float32
    final = run_all_layers(stack, reader, inputs)
    logits = stack.logits(reader, ids, final.hidden, "cpu", batch_size=4)
    with torch.no_grad():
        reference = full_model(path)(input_ids=ids).logits
    assert logits.shape == reference.shape
    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)


def test_eager_attention_also_matches(tiny_pair):
    path = tiny_pair("mistral", "float32")[1]
    reader = CheckpointReader(path)
    stack = DecoderStack(reader, attn_implementation="eager")
    ids = calibration_ids()
    final = run_all_layers(stack, reader, stack.embed(reader, ids))
    with torch.no_grad():
        reference = full_model(path, attn_implementation="eager")(input_ids=ids).logits
    torch.testing.assert_close(stack.logits(reader, ids, final.hidden), reference, rtol=1e-5, atol=1e-5)


def test_per_layer_arguments_are_captured(tiny_pair):
    """qwen2's layer 0 uses full attention, layers 1-2 a sliding window: their masks differ, and it matters."""
    reader = CheckpointReader(tiny_pair("qwen2", "float32")[1])
    stack = DecoderStack(reader)
    inputs = stack.embed(reader, calibration_ids())
    mask_last = inputs.layer_kwargs[2]["attention_mask"]
    assert isinstance(mask_last, PerBatch) and mask_last.tensor.shape == (1, 1, SEQ_LEN, SEQ_LEN)
    assert inputs.layer_kwargs[0]["attention_mask"] is not mask_last
    # position embeddings are shared, not copied, between layers
    assert inputs.layer_kwargs[0]["position_embeddings"][0] is inputs.layer_kwargs[2]["position_embeddings"][0]
    layer = stack.build_layer(2, stack.read_layer_state(reader, 2))
    right = run_layer(layer, inputs)
    wrong = run_layer(layer, inputs, layer_index=0)
    assert not torch.allclose(right, wrong, atol=1e-4)


def test_batch_size_does_not_change_outputs(tiny_pair):
    reader = CheckpointReader(tiny_pair("mistral", "bfloat16")[0])
    stack = DecoderStack(reader)
    inputs = stack.embed(reader, calibration_ids(), batch_size=5)
    layer = stack.build_layer(0, stack.read_layer_state(reader, 0))
    torch.testing.assert_close(run_layer(layer, inputs, batch_size=1), run_layer(layer, inputs, batch_size=4))


def test_low_precision_layer(tiny_pair):
    reader = CheckpointReader(tiny_pair("llama", "bfloat16")[1])
    stack = DecoderStack(reader)
    inputs = stack.embed(reader, calibration_ids())
    state = stack.read_layer_state(reader, 1)
    exact = run_layer(stack.build_layer(1, state), inputs)
    layer_bf16 = stack.build_layer(1, state, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in layer_bf16.parameters())
    approx = run_layer(layer_bf16, inputs)
    assert approx.dtype == torch.float32
    assert (approx - exact).norm() / exact.norm() < 2e-2


def test_layer_inputs_move_and_keep_sharing(tiny_pair):
    reader = CheckpointReader(tiny_pair("llama", "float32")[0])
    stack = DecoderStack(reader)
    inputs = stack.embed(reader, calibration_ids())
    moved = inputs.to("cpu")
    assert moved.hidden.shape == inputs.hidden.shape and moved.n_sequences == N_SEQ and moved.seq_len == SEQ_LEN
    assert moved.layer_kwargs[0]["position_embeddings"][0] is moved.layer_kwargs[1]["position_embeddings"][0]
    with pytest.raises(ValueError):
        inputs.with_hidden(torch.zeros(2, SEQ_LEN, 64))


def test_build_layer_errors(tiny_pair):
    reader = CheckpointReader(tiny_pair("llama", "float32")[0])
    stack = DecoderStack(reader)
    state = stack.read_layer_state(reader, 0)
    del state["mlp.up_proj.weight"]
    with pytest.raises(CheckpointError, match="mlp.up_proj.weight"):
        stack.build_layer(0, state)
    inputs = stack.embed(reader, calibration_ids())
    plain = torch.nn.Linear(64, 64)
    with pytest.raises(ValueError, match="layer_index"):
        run_layer(plain, inputs)


def test_embed_reads_only_what_runs_before_layer_0(tiny_pair, monkeypatch):
    reader = CheckpointReader(tiny_pair("llama", "float32")[0])
    stack = DecoderStack(reader)
    read: list[str] = []
    real_get = reader.get
    monkeypatch.setattr(reader, "get", lambda name, *a, **k: read.append(name) or real_get(name, *a, **k))
    inputs = stack.embed(reader, calibration_ids())
    assert read == ["model.embed_tokens.weight"]
    read.clear()
    stack.logits(reader, calibration_ids(), inputs.hidden)
    assert sorted(read) == ["lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(tiny_pair):
    reader = CheckpointReader(tiny_pair("qwen2", "bfloat16")[1])
    stack = DecoderStack(reader)
    ids = calibration_ids()
    results = {}
    for device in ("cpu", "cuda"):
        inputs = stack.embed(reader, ids, device)
        layer = stack.build_layer(1, stack.read_layer_state(reader, 1), device)
        stats, outputs = capture_hessians(layer, inputs, return_outputs=True)
        assert outputs.device.type == device and stats["mlp.down_proj"].H.device.type == device
        results[device] = (stats["self_attn.q_proj"].H.cpu(), outputs.cpu())
    torch.testing.assert_close(results["cuda"][0], results["cpu"][0], rtol=1e-3, atol=1e-2)
    torch.testing.assert_close(results["cuda"][1], results["cpu"][1], rtol=1e-3, atol=1e-3)
