"""A crafted delta file (checksums recomputed, as an attacker would) is refused with one line before any
write: no path outside the output, no output directory, no NaN merged (docs/security.md)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from prinmix import api
from prinmix.cli import main
from prinmix.errors import DeltaFormatError
from prinmix.format.delta_file import METADATA_KEY, load_delta, metadata_digest, tensor_sha256
from prinmix.format.file_names import aux_name_problem

Q = "model.layers.0.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def genuine(tiny_pair, tmp_path_factory):
    """(base, a genuine lowrank delta of the tiny llama pair)."""
    base, ft = tiny_pair("llama", "fp32")
    delta = tmp_path_factory.mktemp("genuine") / "genuine.delta"
    api.compress(base, ft, delta, method="lowrank")
    return base, delta


def craft(src, dst, edit):
    """Copy delta SRC to DST with edit(tensors, meta) applied, every checksum recomputed."""
    with safe_open(str(src), framework="pt") as f:
        meta = json.loads(f.metadata()[METADATA_KEY])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(tensors, meta)
    meta["checksums"] = {k: tensor_sha256(t) for k, t in tensors.items()}
    meta["metadata_sha256"] = metadata_digest(meta)
    save_file(tensors, str(dst), metadata={METADATA_KEY: json.dumps(meta, sort_keys=True)})
    return dst


def _add_aux(name, data=b'{"x": 1}'):
    def edit(tensors, meta):
        tensors[f"aux/{name}"] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return edit


def _set_meta(path, value):
    def edit(tensors, meta):
        target = meta
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return edit


def _rename_matrix(tensors, meta):
    meta["matrices"]["model.layers.7.self_attn.q_proj.weight"] = meta["matrices"].pop(Q)
    tensors["linear/model.layers.7.self_attn.q_proj.weight"] = tensors.pop(f"linear/{Q}")


def _swap_shape(tensors, meta):
    gate = "model.layers.0.mlp.gate_proj.weight"  # not square: [intermediate, hidden]
    meta["matrices"][gate] = meta["matrices"][gate][::-1]


def _dense(name, tensor):
    def edit(tensors, meta):
        tensors[f"dense/{name}"] = tensor
    return edit


CRAFTED = {
    "aux traversal": (lambda t: _add_aux("../../escaped.json"), "not a plain file name"),
    "aux absolute": (lambda t: _add_aux(str(t / "absolute.json")), "not a plain file name"),
    "aux weights name": (lambda t: _add_aux("model.safetensors"), "not a config/tokenizer file"),
    "aux_from_base traversal": (lambda t: _set_meta(["params", "aux_from_base"],
                                                    {"../../../../etc/hostname": "0" * 64}), "not a plain file name"),
    "matrices a list": (lambda t: _set_meta(["matrices"], [[Q, [64, 64]]]), "'matrices' is a list"),
    "matrix shape of strings": (lambda t: _set_meta(["matrices", Q], ["64", "64"]), "[int, int]"),
    "ratio a string": (lambda t: _set_meta(["ratio"], "1/16"), "not a positive number"),
    "unknown method": (lambda t: _set_meta(["method"], "pickle"), "unknown method"),
    "removed_tensors a string": (lambda t: _set_meta(["params", "removed_tensors"], "model.norm.weight"),
                                 "removed_tensors"),
    "removed tensor not in base": (lambda t: _set_meta(["params", "removed_tensors"], ["no.such.weight"]),
                                   "removed tensor"),
    "matrix not in base": (lambda t: _rename_matrix, "not a tensor of the base"),
    "matrix shape mismatch": (lambda t: _swap_shape, "the base's tensor is"),
    "dense shape mismatch": (lambda t: _dense("model.norm.weight", torch.ones(3)), "the base's tensor is"),
    "NaN in a dense tensor": (lambda t: _dense("model.norm.weight", torch.full((64,), float("nan"))), "NaN/Inf"),
    "unknown tensor kind": (lambda t: lambda tensors, meta: tensors.__setitem__("exec/x", torch.ones(1)),
                            "not one the format"),
}


def _listing(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_crafted_file_gives_one_line_and_writes_nothing(genuine, tmp_path, capsys, case):
    base, src = genuine
    make_edit, needle = CRAFTED[case]
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    crafted = craft(src, work / "crafted.delta", make_edit(tmp_path))
    before = _listing(tmp_path)
    capsys.readouterr()
    for argv in (["merge", str(base), str(crafted), "-o", str(work / "out")],
                 ["export-lora", str(base), str(crafted), "-o", str(work / "out"), "--allow-lossy"]):
        assert main(argv) == 2, case
        err = capsys.readouterr().err.strip()
        assert err.startswith("prinmix: error:") and "\n" not in err, err
        assert needle in err and str(crafted) in err, err
    assert _listing(tmp_path) == before, "something was written"
    assert not (tmp_path / "escaped.json").exists() and not (tmp_path / "absolute.json").exists()


def test_metadata_checksum_catches_an_edit_not_recomputed(genuine, tmp_path):
    _, src = genuine
    with safe_open(str(src), framework="pt") as f:
        raw = f.metadata()[METADATA_KEY]
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta = json.loads(raw)
    meta["ratio"] = 0.5  # a plausible edit; the tensor checksums still match
    save_file(tensors, str(tmp_path / "edited.delta"), metadata={METADATA_KEY: json.dumps(meta, sort_keys=True)})
    with pytest.raises(DeltaFormatError, match="checksum mismatch in its metadata"):
        load_delta(tmp_path / "edited.delta")


def test_genuine_file_round_trips(genuine, tmp_path):
    base, src = genuine
    crafted = craft(src, tmp_path / "same.delta", lambda tensors, meta: None)
    out = api.merge(base, crafted, tmp_path / "out")
    assert (out / "model.safetensors").is_file()


@pytest.mark.parametrize("name", ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                                  "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
                                  "tokenizer.model", "spiece.model", "chat_template.jinja", "qwen.tiktoken",
                                  "preprocessor_config.json"])
def test_hugging_face_file_names_are_allowed(name):
    assert aux_name_problem(name) is None


@pytest.mark.parametrize("name", ["../config.json", "/etc/passwd.json", "a/b.json", "a\\b.json", ".hidden.json",
                                  "..json", "", "x.json\0", "model.safetensors", "model.safetensors.index.json",
                                  "c:config.json", "x" * 300 + ".json", 7])
def test_other_names_are_refused(name):
    assert aux_name_problem(name) is not None
