"""The compress pipeline: where calibration activations come from, resume after kill -9, bad input."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from prinmix import api
from prinmix.api import CalibrationConfig
from prinmix.calibration.data import load_calibration
from prinmix.cli import main
from prinmix.pipeline.events import hessian_listener

FAST_CALIBRATION = CalibrationConfig(nsamples=6, seqlen=48)
FAST = dict(calibration=FAST_CALIBRATION)


def _input_hessian(model_dir, ids, module_name):
    """Σ x xᵀ of the input of `module_name` when the checkpoint runs on ids (independent of prinmix)."""
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    acc = {}

    def hook(mod, args):
        x = args[0].reshape(-1, args[0].shape[-1]).double()
        acc["H"] = acc.get("H", 0) + x.T @ x

    handle = model.get_submodule(module_name).register_forward_pre_hook(hook)
    with torch.no_grad():
        model(ids)
    handle.remove()
    return acc["H"]


def test_hessians_come_from_the_reconstructed_model(tiny_pair, tmp_path):
    """Layer 1's H is XXᵀ of what base + compressed layer-0 delta feeds it, not the fine-tune's X."""
    base, ft = tiny_pair("llama", "fp32")
    seen = {}
    delta = tmp_path / "d.delta"
    # exact embeddings: the pass embeds with the fine-tune's exact rows (the vocabulary rows are compressed after
    # it, pipeline/compress.py step 4), so only then is "merged" the model the pass ran
    api.compress(base, ft, delta, ratio="1/16", listeners=[hessian_listener(lambda i, h: seen.update({i: h}))],
                 exact_embeddings=True, **FAST)
    merged = api.merge(base, delta, tmp_path / "merged")
    ids = load_calibration(None, AutoTokenizer.from_pretrained(str(ft)), FAST_CALIBRATION.nsamples, FAST_CALIBRATION.seqlen, 0)
    name = "model.layers.1.self_attn.q_proj"
    ours = seen[1][name + ".weight"].double()
    from_merged = _input_hessian(merged, ids, name)
    from_finetune = _input_hessian(ft, ids, name)
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    assert rel(ours, from_merged) < 1e-4
    assert rel(ours, from_finetune) > 10 * rel(ours, from_merged)


def test_resume_after_kill_is_byte_identical(tiny_pair, tmp_path):
    base, ft = tiny_pair("qwen2", "bf16")
    reference = tmp_path / "ref.delta"
    api.compress(base, ft, reference, ratio="1/16", **FAST)

    out = tmp_path / "resumed.delta"
    cmd = [sys.executable, "-m", "prinmix.cli", "compress", str(base), str(ft), "-o", str(out),
           "--nsamples", str(FAST_CALIBRATION.nsamples), "--seqlen", str(FAST_CALIBRATION.seqlen)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list(tmp_path.glob(".resumed.delta.partial-*/layer_00000.safetensors")):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists(), "the run finished before it could be killed"
    assert list(tmp_path.glob(".resumed.delta.partial-*/layer_00000.safetensors"))
    assert main(cmd[3:]) == 0
    assert out.read_bytes() == reference.read_bytes()
    assert not list(tmp_path.glob(".resumed.delta.partial-*")), "partial results left behind"


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _fails(capsys, argv, *needles):
    capsys.readouterr()  # drop what fixtures wrote (e.g. transformers' shard progress while building models)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("prinmix: error:") and "\n" not in err, err
    for needle in needles:
        assert str(needle) in err, err
    return err


def test_bad_inputs_give_one_line_errors(tiny_pair, tmp_path, capsys):
    base, ft = tiny_pair("llama", "fp32")
    qbase, _ = tiny_pair("qwen2", "fp32")
    out = tmp_path / "x.delta"
    opts = ["--nsamples", "4", "--seqlen", "32"]

    _fails(capsys, ["compress", str(tmp_path / "nope"), str(ft), "-o", str(out)], tmp_path / "nope")
    _fails(capsys, ["compress", str(qbase), str(ft), "-o", str(out)], "model_type")
    for ratio in ("0", "2", "abc", "1/0"):
        _fails(capsys, ["compress", str(base), str(ft), "-o", str(out), "--ratio", ratio], "ratio")
    _fails(capsys, ["compress", str(base), str(ft), "-o", str(out), "--ratio", "1/100000", *opts], "ratio")
    _fails(capsys, ["compress", str(base), str(ft), "-o", str(out), "--method", "bitdelta", "--ratio", "1/32"],
           "bitdelta")
    if not torch.cuda.is_available():
        _fails(capsys, ["compress", str(base), str(ft), "-o", str(out), "--device", "cuda"], "CUDA")
    _fails(capsys, ["compress", str(base), str(ft), "-o", str(out), "--bits", "2,three"], "--bits")
    _fails(capsys, ["compress", str(base), str(ft), "-o", str(out), "--nsamples", "0"], "--nsamples")
    _fails(capsys, ["compress", str(base), str(ft), "-o", str(tmp_path), *opts], "is a directory")
    _fails(capsys, ["compress", str(base), str(ft), "-o", str(out), "--calib", str(tmp_path / "no.txt"), *opts],
           "no.txt")
    assert not list(tmp_path.glob(".x.delta.partial-*"))          # a run failing on its inputs leaves no litter
    _fails(capsys, ["compress", str(base), str(ft), "-o", str(out), "--bits", "2,9", *opts], "widths")
    _fails(capsys, ["compress", str(base), str(ft), "-o", str(out), "--fmax", "0", *opts], "fmax")

    nan_ft = _copy(ft, tmp_path / "nan_ft")
    weights = load_file(str(nan_ft / "model.safetensors"))
    name = "model.layers.0.mlp.down_proj.weight"
    weights[name][0, 0] = float("nan")
    save_file(weights, str(nan_ft / "model.safetensors"), metadata={"format": "pt"})
    _fails(capsys, ["compress", str(base), str(nan_ft), "-o", str(out), *opts], "NaN", name)

    unknown = _copy(ft, tmp_path / "unknown")
    cfg = (unknown / "config.json").read_text().replace('"model_type": "llama"', '"model_type": "llamazing"')
    (unknown / "config.json").write_text(cfg)
    _fails(capsys, ["compress", str(base), str(unknown), "-o", str(out)], "llamazing")
    assert not out.exists()

    delta = tmp_path / "ok.delta"
    assert main(["compress", str(base), str(ft), "-o", str(delta), "--method", "lowrank"]) == 0
    capsys.readouterr()
    _fails(capsys, ["merge", str(qbase), str(delta), "-o", str(tmp_path / "m1")], "llama")
    _fails(capsys, ["merge", str(ft), str(delta), "-o", str(tmp_path / "m2")], "another base")
    _fails(capsys, ["merge", str(base), str(delta), "-o", str(delta)], "is an input of this merge")  # the delta itself
    assert delta.is_file()
    assert not (tmp_path / "m2").exists()

    data = delta.read_bytes()
    truncated = tmp_path / "truncated.delta"
    truncated.write_bytes(data[: len(data) // 2])
    _fails(capsys, ["merge", str(base), str(truncated), "-o", str(tmp_path / "m3")], truncated)
    _fails(capsys, ["info", str(truncated)], truncated)
    corrupted = tmp_path / "corrupted.delta"
    flipped = bytearray(data)
    flipped[-10] ^= 0xFF
    corrupted.write_bytes(bytes(flipped))
    _fails(capsys, ["merge", str(base), str(corrupted), "-o", str(tmp_path / "m4")], corrupted, "checksum")
    not_delta = tmp_path / "weights.delta"
    shutil.copy(base / "model.safetensors", not_delta)
    _fails(capsys, ["info", str(not_delta)], "not a prinmix delta")
    assert not any((tmp_path / f"m{i}").exists() for i in range(1, 5))


def test_bitdelta_scale_distillation_brings_logits_closer(tiny_pair, tmp_path):
    base, ft = tiny_pair("llama", "fp32")
    plain, distilled = tmp_path / "plain.delta", tmp_path / "distilled.delta"
    api.compress(base, ft, plain, method="bitdelta", calibration=CalibrationConfig(nsamples=8, seqlen=48))
    api.compress(base, ft, distilled, method="bitdelta", distill_steps=30, calibration=CalibrationConfig(nsamples=8, seqlen=48))
    ids = load_calibration(None, AutoTokenizer.from_pretrained(str(ft)), 8, 48, seed=5)  # held out

    def logits(path):
        with torch.no_grad():
            return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)(ids).logits

    lf = logits(ft)
    err = {p.name: float((logits(api.merge(base, p, tmp_path / f"m-{p.stem}")) - lf).norm()) for p in (plain, distilled)}
    assert err["distilled.delta"] < err["plain.delta"]
    scales = [m.sign.scale for m in api.load_delta(distilled).matrices.values()]
    assert scales != [m.sign.scale for m in api.load_delta(plain).matrices.values()]


def test_fp32_finetune_of_a_bf16_base_stores_exact_tensors_in_bf16(tiny_pair, tmp_path):
    """Norms and embedding rows of a wider fine-tune are stored in the 16-bit base's dtype: merge writes the
    base's dtype, so the merged checkpoint is the same as with fp32 storage, at half the bytes."""
    from prinmix.checkpoint.reader import CheckpointReader

    base32, ft = tiny_pair("llama", "fp32")
    base = tmp_path / "base-bf16"
    AutoModelForCausalLM.from_pretrained(str(base32), dtype=torch.bfloat16).save_pretrained(str(base))
    for f in base32.iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            shutil.copy(f, base / f.name)
    delta_path = tmp_path / "d.delta"
    api.compress(base, ft, delta_path, method="lowrank", calibration=CalibrationConfig(nsamples=4, seqlen=32),
                 exact_embeddings=True)
    delta = api.load_delta(delta_path)
    assert delta.dense and delta.rows
    assert {t.dtype for t in delta.dense.values()} == {torch.bfloat16}
    assert {v.dtype for _, v, _ in delta.rows.values()} == {torch.bfloat16}
    merged = CheckpointReader(api.merge(base, delta_path, tmp_path / "merged"))
    ft_r = CheckpointReader(ft)
    for name in list(delta.dense)[:3] + list(delta.rows):
        assert torch.equal(merged.get(name, dtype=None), ft_r.get(name, dtype=None).to(torch.bfloat16)), name


def test_tokenizer_files_identical_to_the_base_are_taken_from_it(tiny_pair, tmp_path, capsys):
    base, ft = tiny_pair("llama", "fp32")
    assert (base / "tokenizer.json").read_bytes() == (ft / "tokenizer.json").read_bytes()
    delta_path = tmp_path / "d.delta"
    api.compress(base, ft, delta_path, method="lowrank", calibration=CalibrationConfig(nsamples=4, seqlen=32))
    delta = api.load_delta(delta_path)
    assert "tokenizer.json" not in delta.aux_files and "tokenizer.json" in delta.params["aux_from_base"]
    merged = api.merge(base, delta_path, tmp_path / "merged")
    for f in ft.iterdir():                     # every config/tokenizer file of the fine-tune is in the merge
        if f.suffix in (".json", ".jinja", ".txt", ".model") and not f.name.endswith(".index.json"):
            assert (merged / f.name).read_bytes() == f.read_bytes(), f.name
    AutoTokenizer.from_pretrained(str(merged))

    other = _copy(base, tmp_path / "base-other-tokenizer")   # same weights, edited tokenizer
    (other / "tokenizer.json").write_text((other / "tokenizer.json").read_text() + "\n")
    _fails(capsys, ["merge", str(other), str(delta_path), "-o", str(tmp_path / "m")], "tokenizer.json", "differs")
    assert not (tmp_path / "m").exists()
