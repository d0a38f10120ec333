"""capture_hessians: H = Σ x xᵀ of every linear equals the direct sum over the inputs a plain forward hook sees;
linears fed the same tensor share one accumulation; hooks are removed afterwards."""

from __future__ import annotations

import pytest
import torch

from fixtures.decoder_inputs import LINEARS, N_SEQ, SEQ_LEN, calibration_ids, full_model
from prinmix.calibration.decoder_stack import DecoderStack
from prinmix.calibration.hessians import capture_hessians, unique_hessians
from prinmix.calibration.layer_inputs import run_layer
from prinmix.checkpoint.reader import CheckpointReader


def reference_linear_inputs(path, ids, layer_index: int) -> dict[str, torch.Tensor]:
    """Inputs [tokens, in] of each linear of one layer, from plain forward pre-hooks on the full model."""
    model = full_model(path)
    layer = model.model.layers[layer_index]
    captured: dict[str, list[torch.Tensor]] = {}
    handles = []
    for name in LINEARS:
        module = layer.get_submodule(name)
        hook = lambda mod, args, _n=name: captured.setdefault(_n, []).append(args[0].reshape(-1, args[0].shape[-1]))
        handles.append(module.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(input_ids=ids)
    for handle in handles:
        handle.remove()
    return {name: torch.cat(parts) for name, parts in captured.items()}


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_capture_hessians_matches_direct_sum(tiny_pair, family):
    path = tiny_pair(family, "float32")[1]
    reader = CheckpointReader(path)
    stack = DecoderStack(reader)
    ids = calibration_ids()
    inputs = stack.embed(reader, ids)
    last = stack.num_layers - 1
    for i in range(last):
        inputs = inputs.with_hidden(run_layer(stack.build_layer(i, stack.read_layer_state(reader, i)), inputs))
    layer = stack.build_layer(last, stack.read_layer_state(reader, last))
    stats, outputs = capture_hessians(layer, inputs, batch_size=2, return_outputs=True)

    assert list(stats) == LINEARS
    assert stats["self_attn.q_proj"] is stats["self_attn.k_proj"] is stats["self_attn.v_proj"]
    assert stats["mlp.gate_proj"] is stats["mlp.up_proj"]
    assert stats["self_attn.q_proj"].names == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
    assert len(unique_hessians(stats)) == 4
    reference = reference_linear_inputs(path, ids, last)
    for name, stat in stats.items():
        assert stat.n_tokens == N_SEQ * SEQ_LEN  # accumulated once per token, not once per sharing linear
        assert stat.H.dtype == torch.float32
        x = reference[name]
        torch.testing.assert_close(stat.H, x.T @ x, rtol=1e-4, atol=1e-3)
    assert stats["mlp.down_proj"].H.shape == (128, 128)
    torch.testing.assert_close(outputs, run_layer(layer, inputs))


def test_capture_hessians_without_outputs(tiny_pair):
    reader = CheckpointReader(tiny_pair("mistral", "float32")[0])
    stack = DecoderStack(reader)
    inputs = stack.embed(reader, calibration_ids())
    layer = stack.build_layer(0, stack.read_layer_state(reader, 0))
    stats = capture_hessians(layer, inputs, batch_size=3)
    assert isinstance(stats, dict) and set(stats) == set(LINEARS)
    assert not layer._forward_hooks and not layer.self_attn.q_proj._forward_hooks  # hooks removed
