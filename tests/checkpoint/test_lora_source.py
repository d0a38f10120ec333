"""LoRA adapters as fine-tunes: LoraFinetunedReader against PEFT's own merge, and PrinMix-LoRA end to end."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from fixtures.tiny_models import arithmetic_lines, single_thread, token_windows, train_steps
from prinmix import api
from prinmix.api import CalibrationConfig
from prinmix.checkpoint.lora_source import LoraFinetunedReader, is_lora_adapter
from prinmix.checkpoint.reader import CheckpointReader
from prinmix.cli import main as cli_main
from prinmix.errors import CheckpointError

LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FAST = dict(calibration=CalibrationConfig(nsamples=8, seqlen=48))


def _peft_model(base_dir, **lora_kwargs):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    return get_peft_model(model, LoraConfig(lora_dropout=0.0, **lora_kwargs))


def _randomise_lora(peft_model, seed: int, std: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def _merged_state(peft_model) -> dict[str, torch.Tensor]:
    import copy

    return {k: v.detach() for k, v in copy.deepcopy(peft_model).merge_and_unload().state_dict().items()}


@pytest.fixture(scope="module")
def trained_adapter(tiny_pair, tiny_tokenizer, tmp_path_factory):
    """(base_dir, adapter_dir, peft_model): a rank-8 LoRA on every linear of the tiny Llama, 30 Adam steps on sums."""
    base, _ = tiny_pair("llama", "fp32")
    out = tmp_path_factory.mktemp("lora") / "adapter"
    with single_thread():
        torch.manual_seed(0)
        model = _peft_model(base, r=8, lora_alpha=16, target_modules=LINEARS)
        ids = tiny_tokenizer("\n".join(arithmetic_lines(2000, 5)), add_special_tokens=False)["input_ids"]
        train_steps(model, token_windows(ids, 256, 5), 30, lr=1e-2, seed=5)
        model.save_pretrained(str(out))
    return base, out, model


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_reader_equals_peft_merge(trained_adapter):
    base, adapter, model = trained_adapter
    assert is_lora_adapter(adapter) and not is_lora_adapter(base)
    base_r = CheckpointReader(base)
    reader = LoraFinetunedReader(base_r, adapter)
    merged = _merged_state(model)
    assert reader.tensor_names == base_r.tensor_names
    assert len(reader.lora_targets) == 2 * len(LINEARS)
    for name in reader.tensor_names:
        assert torch.allclose(reader.get(name), merged[name], atol=1e-6), name
        factors = reader.lora_factors(name)
        if name in reader.lora_targets:
            left, right = factors
            assert reader.dtype(name) == torch.float32 and left.shape[1] == right.shape[0] == 8
            assert torch.allclose(left @ right, reader.get(name) - base_r.get(name), atol=1e-6)
        else:
            assert factors is None and torch.equal(reader.get(name, None), base_r.get(name, None))
    entries = sum(base_r.shape(n)[0] * 8 + 8 * base_r.shape(n)[1] for n in reader.lora_targets)
    assert reader.delta_params["lora_adapter_bytes"] == 2 * entries
    assert reader.delta_params["lora_rank"] == 8
    assert reader.tokenizer_path == base_r.path          # the adapter was saved without a tokenizer
    assert reader.content_hash() != base_r.content_hash()


@pytest.mark.parametrize("ratio,closeness", [("1/16", 0.2), ("1/64", 0.6)])  # measured: 0.08, 0.35
def test_prinmix_lora_end_to_end(trained_adapter, tmp_path, capsys, ratio, closeness):
    base, adapter, model = trained_adapter
    delta = tmp_path / "lora.delta"
    summary = api.compress(base, adapter, delta, ratio=ratio, **FAST)
    assert summary.ratio_achieved <= float(eval(ratio)) + 1e-9
    params = api.load_delta(delta).params
    reader = LoraFinetunedReader(CheckpointReader(base), adapter)
    assert params["lora_adapter_bytes"] == reader.delta_params["lora_adapter_bytes"]
    assert summary.linear_bytes < params["lora_adapter_bytes"]          # smaller than the adapter itself
    assert summary.lora_adapter_bytes == params["lora_adapter_bytes"]
    described = api.info(delta)
    assert described.ratio_vs_adapter == pytest.approx(summary.linear_bytes / params["lora_adapter_bytes"])
    # dense 16-bit ΔW is h_out·h_in per target; the adapter r·(h_out+h_in): the two ratios differ by exactly that
    assert described.ratio_vs_adapter == pytest.approx(
        described.ratio_achieved * 2 * described.dense_delta_params / params["lora_adapter_bytes"])
    assert cli_main(["info", str(delta)]) == 0
    assert f"vs LoRA        {described.ratio_vs_adapter:.4g}" in capsys.readouterr().out
    assert cli_main(["compress", str(base), str(adapter), "-o", str(tmp_path / "cli.delta"), "--ratio", ratio,
                     "--nsamples", "8", "--seqlen", "48"]) == 0
    assert f"{summary.linear_bytes / summary.lora_adapter_bytes:.3g} of the LoRA adapter's" in capsys.readouterr().out
    merged = api.merge(base, delta, tmp_path / "merged")

    from transformers import AutoModelForCausalLM

    ids = torch.randint(3, 400, (3, 40), generator=torch.Generator().manual_seed(1))
    lora_model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    lora_model.load_state_dict(_merged_state(model))
    base_model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    ours = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32)
    lf, lb, lm = _logits(lora_model, ids), _logits(base_model, ids), _logits(ours, ids)
    assert (lm - lf).norm() < closeness * (lb - lf).norm(), float((lm - lf).norm() / (lb - lf).norm())


def test_rank_alpha_patterns_embeddings_and_modules_to_save(tiny_pair, tmp_path):
    base, _ = tiny_pair("llama", "fp32")
    with single_thread():
        model = _peft_model(base, r=4, lora_alpha=8, target_modules=["q_proj", "down_proj", "embed_tokens"],
                            rank_pattern={"down_proj": 2}, alpha_pattern={"layers.1.self_attn.q_proj": 3},
                            modules_to_save=["lm_head"])
        _randomise_lora(model, 0)
        with torch.no_grad():
            model.base_model.model.lm_head.modules_to_save["default"].weight.add_(0.01)
        model.save_pretrained(str(tmp_path / "a"))
        merged = _merged_state(model)
    reader = LoraFinetunedReader(CheckpointReader(base), tmp_path / "a")
    assert "lm_head.weight" in reader.tensor_names
    for name in reader.tensor_names:
        assert torch.allclose(reader.get(name), merged[name], atol=1e-6), name
    assert reader.lora_factors("model.embed_tokens.weight") is None       # embedding: exact rows, not a matrix
    assert reader.lora_factors("model.layers.0.mlp.down_proj.weight")[1].shape[0] == 2


def test_rslora_and_fan_in_fan_out(tiny_pair, tmp_path):
    base, _ = tiny_pair("llama", "fp32")
    with single_thread():
        model = _peft_model(base, r=4, lora_alpha=8, target_modules=["q_proj"], use_rslora=True)
        _randomise_lora(model, 1)
        model.save_pretrained(str(tmp_path / "rs"))
        merged = _merged_state(model)
    base_r = CheckpointReader(base)
    reader = LoraFinetunedReader(base_r, tmp_path / "rs")
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.allclose(reader.get(name), merged[name], atol=1e-6)

    # fan_in_fan_out (weights stored [in, out], e.g. GPT-2's Conv1D): ΔW = s·(B·A)ᵀ. q_proj is square.
    fan = tmp_path / "fan"
    shutil.copytree(tmp_path / "rs", fan)
    cfg = json.loads((fan / "adapter_config.json").read_text())
    cfg.update(fan_in_fan_out=True, use_rslora=False)
    (fan / "adapter_config.json").write_text(json.dumps(cfg))
    tensors = load_file(str(fan / "adapter_model.safetensors"))
    reader = LoraFinetunedReader(base_r, fan)
    key = "base_model.model." + name[: -len(".weight")]
    B, A = tensors[key + ".lora_B.weight"], tensors[key + ".lora_A.weight"]
    assert torch.allclose(reader.get(name), base_r.get(name) + 2.0 * (B @ A).T, atol=1e-6)
    left, right = reader.lora_factors(name)
    assert torch.allclose(left @ right, 2.0 * (B @ A).T, atol=1e-6)


def test_tokenizer_files_and_hash_follow_the_adapter(trained_adapter, tiny_models, tmp_path):
    base, adapter, _ = trained_adapter
    copy = tmp_path / "with_tok"
    shutil.copytree(adapter, copy)
    for item in tiny_models.tokenizer_dir.iterdir():
        shutil.copy2(item, copy / item.name)
    (copy / "tokenizer_config.json").write_text((copy / "tokenizer_config.json").read_text().replace("}", ', "x": 1}', 1))
    base_r = CheckpointReader(base)
    plain, with_tok = LoraFinetunedReader(base_r, adapter), LoraFinetunedReader(base_r, copy)
    assert with_tok.tokenizer_path == copy
    assert with_tok.aux_files()["tokenizer_config.json"] == (copy / "tokenizer_config.json").read_bytes()
    assert with_tok.aux_files()["config.json"] == (base / "config.json").read_bytes()
    assert plain.content_hash() == with_tok.content_hash()               # same weights and config
    tensors = load_file(str(copy / "adapter_model.safetensors"))
    first = sorted(tensors)[0]
    tensors[first] = tensors[first] + 1e-3
    save_file(tensors, str(copy / "adapter_model.safetensors"))
    assert LoraFinetunedReader(base_r, copy).content_hash() != plain.content_hash()


def test_refusals(trained_adapter, tmp_path):
    base, adapter, _ = trained_adapter
    base_r = CheckpointReader(base)

    def variant(name, **changes):
        d = tmp_path / name
        shutil.copytree(adapter, d)
        cfg = json.loads((d / "adapter_config.json").read_text())
        cfg.update(changes)
        (d / "adapter_config.json").write_text(json.dumps(cfg))
        return d

    with pytest.raises(CheckpointError, match="use_dora"):
        LoraFinetunedReader(base_r, variant("dora", use_dora=True))
    with pytest.raises(CheckpointError, match="not LoRA"):
        LoraFinetunedReader(base_r, variant("ia3", peft_type="IA3"))
    with pytest.raises(CheckpointError, match="rank 8 but"):
        LoraFinetunedReader(base_r, variant("rank", r=4))
    no_weights = variant("nothing")
    (no_weights / "adapter_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no adapter_model.safetensors"):
        LoraFinetunedReader(base_r, no_weights)
    biased = variant("bias")
    tensors = load_file(str(biased / "adapter_model.safetensors"))
    tensors["base_model.model.model.layers.0.self_attn.o_proj.lora_B.bias"] = torch.zeros(64)
    save_file(tensors, str(biased / "adapter_model.safetensors"))
    with pytest.raises(CheckpointError, match="no bias"):
        LoraFinetunedReader(base_r, biased)


def test_adapter_on_a_renamed_tower(tiny_models, tmp_path):
    """PEFT names modules (model.language_model.layers…); a LLaVA checkpoint stores language_model.model.layers…"""
    from transformers import AutoModelForImageTextToText

    from fixtures.more_architectures import MoreArchitectures

    base, _ = MoreArchitectures(tiny_models).pair("llava")
    from peft import LoraConfig, get_peft_model

    with single_thread():
        model = get_peft_model(AutoModelForImageTextToText.from_pretrained(str(base), dtype=torch.float32),
                               LoraConfig(r=4, lora_alpha=8, target_modules=r".*language_model.*\.(q_proj|down_proj)"))
        _randomise_lora(model, 2)
        model.save_pretrained(str(tmp_path / "a"))
        merged = _merged_state(model)
    reader = LoraFinetunedReader(CheckpointReader(base), tmp_path / "a")
    assert reader.lora_targets[0] == "language_model.model.layers.0.mlp.down_proj.weight"
    for name in reader.lora_targets:
        module_name = "model.language_model." + name[len("language_model.model."):]
        assert torch.allclose(reader.get(name), merged[module_name], atol=1e-6), name
