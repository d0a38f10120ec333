"""export_lora: PEFT loads the adapter and reproduces prinmix merge's logits; truncation to a vLLM
rank reports its error; lossy and BitDelta exports are refused."""

import argparse
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from prinmix import api
from prinmix.api import CalibrationConfig
from prinmix.cli.export import add_export_lora_parser
from prinmix.errors import PrinmixError
from prinmix.export.lora import best_rank_factors, export_lora
from prinmix.format.delta_file import load_delta, save_delta

peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def pair(tiny_pair, tmp_path_factory):
    """(base, full delta, linear-only delta, merged linear-only model) of the tiny llama pair (Delta-CoMe)."""
    base, ft = tiny_pair("llama")
    work = tmp_path_factory.mktemp("export_lora")
    calib = work / "calib.txt"
    calib.write_text("\n".join(f"{a}+{a + 3}={2 * a + 3}" for a in range(300)))
    full = work / "dc.delta"
    api.compress(base, ft, full, ratio="1/8", method="deltacome", device="cpu", calibration=CalibrationConfig(calib=str(calib), nsamples=4, seqlen=32))
    delta = load_delta(full)
    delta.dense.clear()
    delta.rows.clear()
    delta.vocab.clear()
    linear_only = work / "dc_linear.delta"
    save_delta(delta, linear_only)
    merged = AutoModelForCausalLM.from_pretrained(api.merge(base, linear_only, work / "merged")).eval()
    return base, full, linear_only, merged


def _peft_logits(base, adapter, ids):
    model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(adapter)).eval()
    with torch.no_grad():
        return model(ids).logits


IDS = torch.randint(3, 500, (2, 17), generator=torch.Generator().manual_seed(0))


def test_peft_adapter_equals_merge(pair, tmp_path):
    base, _, linear_only, merged = pair
    report = export_lora(base, linear_only, tmp_path / "lora32", dtype=torch.float32)
    with torch.no_grad():
        ref = merged(IDS).logits
    assert torch.allclose(_peft_logits(base, tmp_path / "lora32", IDS), ref, atol=1e-4, rtol=1e-4)
    assert not report["truncated"] and report["rel_error"] < 1e-6 and not report["left_out"]

    config = json.loads((tmp_path / "lora32" / "adapter_config.json").read_text())
    ranks = {m["rank"] for m in report["modules"].values()}
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM" and config["bias"] == "none"
    assert config["r"] == config["lora_alpha"] == max(ranks) and config["modules_to_save"] is None
    assert set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"}
    tensors = load_file(str(tmp_path / "lora32" / "adapter_model.safetensors"))
    assert all(t.shape[0 if ".lora_A." in n else 1] == config["r"] for n, t in tensors.items())  # zero-padded to r
    assert all(n.startswith("base_model.model.model.layers.") for n in tensors)

    export_lora(base, linear_only, tmp_path / "lora16")                                     # default float16
    assert torch.allclose(_peft_logits(base, tmp_path / "lora16", IDS), ref, atol=2e-2, rtol=1e-2)


def test_truncation_to_a_vllm_rank_reports_its_error(pair, tmp_path):
    base, _, linear_only, merged = pair
    full = export_lora(base, linear_only, tmp_path / "full", dtype=torch.float32)
    report = export_lora(base, linear_only, tmp_path / "r8", max_rank=8, dtype=torch.float32)
    assert report["r"] <= 8 and report["truncated"] and report["vllm_max_lora_rank"] == 8
    assert report["truncation_rel_error"] > full["truncation_rel_error"] == 0
    tensors = load_file(str(tmp_path / "r8" / "adapter_model.safetensors"))
    delta = load_delta(linear_only)
    num = den = 0.0
    for name, m in delta.matrices.items():
        path = name[: -len(".weight")]
        a = tensors[f"base_model.model.{path}.lora_A.weight"].double()
        b = tensors[f"base_model.model.{path}.lora_B.weight"].double()
        dw = m.reconstruct().double()
        num += float(((dw - b @ a) ** 2).sum())
        den += float((dw ** 2).sum())
        info = report["modules"][path]
        assert info["exported_rank"] == min(8, info["rank"])
        # least error: never worse than keeping the first 8 stored ranks
        fb, fa = m.factors()
        naive = float(((dw - fb[:, :8].double() @ fa[:8].double()) ** 2).sum())
        assert float(((dw - b @ a) ** 2).sum()) <= naive + 1e-9
    assert abs((num / den) ** 0.5 - report["rel_error"]) < 1e-6
    with torch.no_grad():
        ref = merged(IDS).logits
    err_trunc = (_peft_logits(base, tmp_path / "r8", IDS) - ref).abs().max()
    assert err_trunc > 1e-3


def test_best_rank_factors_is_the_truncated_svd():
    g = torch.Generator().manual_seed(0)
    b, a = torch.randn(20, 7, generator=g), torch.randn(7, 15, generator=g)
    b2, a2 = best_rank_factors(b, a, 3)
    u, s, vh = torch.linalg.svd((b @ a).double())
    assert torch.allclose(b2 @ a2, (u[:, :3] * s[:3]) @ vh[:3], atol=1e-9)


def test_refusals(pair, tiny_pair, tmp_path):
    base, full, linear_only, _ = pair
    with pytest.raises(PrinmixError, match="outside the linear layers"):
        export_lora(base, full, tmp_path / "lossy")
    assert not (tmp_path / "lossy").exists()
    report = export_lora(base, full, tmp_path / "lossy", allow_lossy=True)
    assert "model.norm.weight" in report["left_out"] and "lm_head.weight" in report["left_out"]
    with pytest.raises(PrinmixError, match="max-lora-rank"):
        export_lora(base, linear_only, tmp_path / "r10", max_rank=10)
    with pytest.raises(PrinmixError, match="not empty"):
        export_lora(base, linear_only, tmp_path / "lossy")
    _, ft = tiny_pair("llama")
    api.compress(base, ft, tmp_path / "bd.delta", ratio="1/8", method="bitdelta", device="cpu")
    with pytest.raises(PrinmixError, match="BitDelta"):
        export_lora(base, tmp_path / "bd.delta", tmp_path / "bd", allow_lossy=True)


def test_cli_subcommand(pair, tmp_path, capsys):
    base, _, linear_only, _ = pair
    parser = argparse.ArgumentParser(prog="prinmix")
    add_export_lora_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["export-lora", str(base), str(linear_only), "-o", str(tmp_path / "cli"),
                              "--max-rank", "16", "--dtype", "bfloat16"])
    assert args.fn(args) == 0
    out = capsys.readouterr().out
    assert "--enable-lora" in out and (tmp_path / "cli" / "adapter_model.safetensors").exists()
    assert load_file(str(tmp_path / "cli" / "adapter_model.safetensors")).popitem()[1].dtype == torch.bfloat16
