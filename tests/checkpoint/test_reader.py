"""CheckpointReader and check_compatible on tiny real checkpoints, including every kind of bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from prinmix.checkpoint.compatibility import check_compatible
from prinmix.checkpoint.reader import CheckpointReader
from prinmix.errors import ArchitectureMismatchError, CheckpointError


def copy_checkpoint(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


@pytest.fixture(scope="module")
def sharded_llama(tiny_pair, tmp_path_factory) -> Path:
    """The float32 llama base re-saved as several safetensors shards with an index."""
    from transformers import AutoModelForCausalLM

    base, _ = tiny_pair("llama", "float32")
    target = tmp_path_factory.mktemp("sharded") / "llama"
    AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).save_pretrained(target, max_shard_size="100KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(base / name, target / name)
    return target


def test_single_file_reader_metadata_and_tensors(tiny_pair):
    base, _ = tiny_pair("llama", "bfloat16")
    reader = CheckpointReader(base)
    assert reader.path == base and reader.model_type == "llama"
    assert reader.config.hidden_size == 64 and reader.config_dict["model_type"] == "llama"
    assert reader.tensor_names == sorted(reader.tensor_names)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert reader.shape(name) == (64, 64) and reader.dtype(name) == torch.bfloat16
    stored = reader.get(name, dtype=None)
    assert stored.dtype == torch.bfloat16
    as_float = reader.get(name)
    assert as_float.dtype == torch.float32 and torch.equal(as_float, stored.float())
    assert not reader.tied_embeddings
    with pytest.raises(CheckpointError, match="no tensor named"):
        reader.get("model.nope.weight")


def test_sharded_reader_matches_single_file(tiny_pair, sharded_llama):
    base, _ = tiny_pair("llama", "float32")
    single, sharded = CheckpointReader(base), CheckpointReader(sharded_llama)
    assert len({single.file_of(n) for n in single.tensor_names}) == 1
    assert len({sharded.file_of(n) for n in sharded.tensor_names}) > 1
    assert single.tensor_names == sharded.tensor_names
    for name in single.tensor_names:
        assert single.shape(name) == sharded.shape(name)
        assert torch.equal(single.get(name), sharded.get(name))
    # the fingerprint ignores the file layout
    assert single.content_hash() == sharded.content_hash()


def test_content_hash_stable_and_discriminating(tiny_pair):
    base, finetuned = tiny_pair("llama", "float32")
    first = CheckpointReader(base).content_hash()
    assert first == CheckpointReader(base).content_hash()
    assert len(first) == 64
    assert first != CheckpointReader(finetuned).content_hash()
    other_family = CheckpointReader(tiny_pair("mistral", "float32")[0]).content_hash()
    assert first != other_family
    bf16 = CheckpointReader(tiny_pair("llama", "bfloat16")[0]).content_hash()
    assert first != bf16
    subset = ["model.norm.weight"]
    assert CheckpointReader(base).content_hash(subset) != first


def test_aux_files(tiny_pair, sharded_llama):
    base, _ = tiny_pair("qwen2", "float32")
    files = CheckpointReader(base).aux_files()
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= set(files)
    assert not any(name.endswith(".safetensors") for name in files)
    assert json.loads(files["config.json"])["model_type"] == "qwen2"
    assert "model.safetensors.index.json" not in CheckpointReader(sharded_llama).aux_files()


def test_tied_embeddings(tiny_pair):
    reader = CheckpointReader(tiny_pair("qwen2", "float32")[0])
    assert reader.tied_embeddings and "lm_head.weight" not in reader.tensor_names


def test_missing_directory(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(CheckpointError, match="no such directory") as info:
        CheckpointReader(missing)
    assert str(missing) in str(info.value)


def test_file_instead_of_directory(tmp_path):
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="not a directory"):
        CheckpointReader(file)


def test_no_config(tiny_pair, tmp_path):
    target = copy_checkpoint(tiny_pair("llama", "float32")[0], tmp_path / "ckpt")
    (target / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json") as info:
        CheckpointReader(target)
    assert str(target) in str(info.value)


def test_config_not_json(tiny_pair, tmp_path):
    target = copy_checkpoint(tiny_pair("llama", "float32")[0], tmp_path / "ckpt")
    (target / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON") as info:
        CheckpointReader(target)
    assert str(target / "config.json") in str(info.value)


def test_unknown_model_type(tiny_pair, tmp_path):
    target = copy_checkpoint(tiny_pair("llama", "float32")[0], tmp_path / "ckpt")
    config = json.loads((target / "config.json").read_text())
    config["model_type"] = "frobnicator"
    (target / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="'frobnicator' is unknown") as info:
        CheckpointReader(target)
    assert str(target) in str(info.value)


def test_bin_only_checkpoint(tiny_pair, tmp_path):
    target = copy_checkpoint(tiny_pair("llama", "float32")[0], tmp_path / "ckpt")
    state = load_file(target / "model.safetensors")
    (target / "model.safetensors").unlink()
    torch.save(state, target / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="convert to safetensors") as info:
        CheckpointReader(target)
    assert str(target) in str(info.value)


def test_no_weights_at_all(tiny_pair, tmp_path):
    target = copy_checkpoint(tiny_pair("llama", "float32")[0], tmp_path / "ckpt")
    (target / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        CheckpointReader(target)


def test_nan_tensor(tiny_pair, tmp_path):
    target = copy_checkpoint(tiny_pair("llama", "bfloat16")[0], tmp_path / "ckpt")
    state = load_file(target / "model.safetensors")
    name = "model.layers.1.mlp.down_proj.weight"
    state[name][3, 5] = float("nan")
    save_file(state, target / "model.safetensors", metadata={"format": "pt"})
    reader = CheckpointReader(target)  # metadata is fine; the data check happens on read
    with pytest.raises(CheckpointError, match="NaN/Inf") as info:
        reader.get(name)
    assert str(target / "model.safetensors") in str(info.value) and name in str(info.value)
    assert torch.isnan(reader.get(name, check_finite=False)).any()
    reader.get("model.layers.0.mlp.down_proj.weight")


def test_missing_shard(sharded_llama, tmp_path):
    target = copy_checkpoint(sharded_llama, tmp_path / "ckpt")
    shard = sorted(target.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match="which is missing") as info:
        CheckpointReader(target)
    assert shard.name in str(info.value) and str(target) in str(info.value)


def test_truncated_safetensors(tiny_pair, tmp_path):
    target = copy_checkpoint(tiny_pair("llama", "float32")[0], tmp_path / "ckpt")
    weights = target / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated") as info:
        CheckpointReader(target)
    assert str(weights) in str(info.value)


def test_compatible_pair_reports_nothing(tiny_pair):
    base, finetuned = tiny_pair("qwen2", "bfloat16")
    report = check_compatible(CheckpointReader(base), CheckpointReader(finetuned))
    assert report.resized_vocab == {} and report.only_in_base == [] and report.only_in_finetuned == []


def test_different_architectures(tiny_pair):
    llama, mistral = tiny_pair("llama", "float32")[0], tiny_pair("mistral", "float32")[1]
    with pytest.raises(ArchitectureMismatchError, match="model_type") as info:
        check_compatible(CheckpointReader(llama), CheckpointReader(mistral))
    assert str(llama) in str(info.value) and str(mistral) in str(info.value)


def test_different_structure(tiny_pair, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    base = tiny_pair("llama", "float32")[0]
    config = AutoConfig.from_pretrained(base)
    config.num_hidden_layers = 3
    other = tmp_path / "deeper"
    AutoModelForCausalLM.from_config(config).save_pretrained(other)
    with pytest.raises(ArchitectureMismatchError, match="num_hidden_layers") as info:
        check_compatible(CheckpointReader(base), CheckpointReader(other))
    assert str(base) in str(info.value) and str(other) in str(info.value)


def test_mismatched_tensor_shape(tiny_pair, tmp_path):
    base, finetuned = tiny_pair("llama", "float32")
    target = copy_checkpoint(finetuned, tmp_path / "ft")
    state = load_file(target / "model.safetensors")
    state["model.layers.0.self_attn.o_proj.weight"] = state["model.layers.0.self_attn.o_proj.weight"][:, :32].clone()
    save_file(state, target / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ArchitectureMismatchError, match="o_proj") as info:
        check_compatible(CheckpointReader(base), CheckpointReader(target))
    assert str(base) in str(info.value) and str(target) in str(info.value)


def test_enlarged_vocabulary_is_reported_not_rejected(tiny_pair, tmp_path):
    from transformers import AutoModelForCausalLM

    base, finetuned = tiny_pair("llama", "float32")
    model = AutoModelForCausalLM.from_pretrained(finetuned, dtype=torch.float32)
    model.resize_token_embeddings(model.config.vocab_size + 8)
    target = tmp_path / "bigger_vocab"
    model.save_pretrained(target)
    report = check_compatible(CheckpointReader(base), CheckpointReader(target))
    assert set(report.resized_vocab) == {"model.embed_tokens.weight", "lm_head.weight"}
    base_shape, ft_shape = report.resized_vocab["lm_head.weight"]
    assert ft_shape[0] == base_shape[0] + 8 and ft_shape[1:] == base_shape[1:]
