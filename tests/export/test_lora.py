"""export_lora: PEFT loads the adapter and reproduces prinmix merge's logits — linear-only deltas and whole
fine-tunes (norms folded, embedding / lm_head rows, tied embeddings) on every tiny family; truncation to a
vLLM rank reports its error; what no LoRA adapter can carry is refused, naming the tensor."""

import argparse
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from prinmix import api
from prinmix.api import CalibrationConfig
from prinmix.checkpoint.reader import CheckpointReader
from prinmix.cli.export import add_export_lora_parser
from prinmix.errors import PrinmixError
from prinmix.export import lora as lora_module
from prinmix.export.lora import best_rank_factors, export_lora, factors_of_rows, fold_norm, row_delta_factors
from prinmix.export.norm_fold import NormFoldError, fold_targets, norm_ratio
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
    report = export_lora(base, linear_only, tmp_path / "lora32", dtype=torch.float32, check=False)
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

    export_lora(base, linear_only, tmp_path / "lora16", check=False)                                   # default float16
    assert torch.allclose(_peft_logits(base, tmp_path / "lora16", IDS), ref, atol=2e-2, rtol=1e-2)


def test_truncation_to_a_vllm_rank_reports_its_error(pair, tmp_path):
    base, _, linear_only, merged = pair
    full = export_lora(base, linear_only, tmp_path / "full", dtype=torch.float32, check=False)
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
    base, _, linear_only, _ = pair
    with pytest.raises(PrinmixError, match="max-lora-rank"):
        export_lora(base, linear_only, tmp_path / "r10", max_rank=10)
    export_lora(base, linear_only, tmp_path / "once", check=False)
    with pytest.raises(PrinmixError, match="not empty"):
        export_lora(base, linear_only, tmp_path / "once", check=False)
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


# --------------------------------------------------------------------------- whole fine-tunes
def _compress(tiny_pair, family, path, exact_embeddings=False):
    base, ft = tiny_pair(family)
    calib = path.parent / "calib.txt"
    calib.write_text("\n".join(f"{a}+{a + 3}={2 * a + 3}" for a in range(300)))
    api.compress(base, ft, path, ratio="1/8", method="deltacome", device="cpu", exact_embeddings=exact_embeddings,
                 calibration=CalibrationConfig(calib=str(calib), nsamples=4, seqlen=32))
    return base, ft


def _merged_logits(base, delta_path, out):
    model = AutoModelForCausalLM.from_pretrained(api.merge(base, delta_path, out)).eval()
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("family", ["llama", "mistral", "llama_hd32"])
def test_whole_finetune_exports_exactly(family, tiny_pair, tmp_path):
    """Norms, embedding rows and lm_head (tied for llama_hd32) all change; base + adapter = merge."""
    delta_path = tmp_path / "full.delta"
    base, ft = _compress(tiny_pair, family, delta_path)
    delta = load_delta(delta_path)
    emb = "model.embed_tokens.weight"   # exact rows, or compressed ones (whole-delta mode, the default)
    assert any(n.endswith("norm.weight") for n in delta.dense) and (emb in delta.rows or emb in delta.vocab)
    report = export_lora(base, delta_path, tmp_path / "lora", dtype=torch.float32, finetuned=ft)
    ref = _merged_logits(base, delta_path, tmp_path / "merged")
    assert torch.allclose(_peft_logits(base, tmp_path / "lora", IDS), ref, atol=1e-4, rtol=1e-4)
    assert not report["left_out"] and not report["truncated"]
    assert {"embed_tokens", "lm_head"} <= set(report["target_modules"])
    assert report["modules"]["model.layers.0.self_attn.q_proj"]["folded_norm"]
    whole = report["whole_model"]
    assert whole["adapter_vs_merge"]["greedy_agreement"] == 1.0
    assert whole["adapter_vs_merge"]["rel_logit_error"] < 1e-4
    merge_ft = whole["merge_vs_finetuned"]["rel_logit_error"]
    assert abs(whole["adapter_vs_finetuned"]["rel_logit_error"] - merge_ft) < 1e-3 + 1e-3 * merge_ft
    if emb in delta.vocab:   # compressed rows: the adapter carries their rank, not d spurious rounding ranks
        assert report["modules"]["model.embed_tokens"]["rank"] == delta.vocab[emb][1].rank
    tensors = load_file(str(tmp_path / "lora" / "adapter_model.safetensors"))
    vocab, d = (delta.rows.get(emb) or delta.vocab[emb])[2]
    assert tensors["base_model.model.model.embed_tokens.lora_embedding_A"].shape == (report["r"], vocab)
    assert tensors["base_model.model.model.embed_tokens.lora_embedding_B"].shape == (d, report["r"])


def test_qwen2_biases_refused_and_the_rest_exact(tiny_pair, tmp_path):
    """vLLM serves no LoRA bias: a changed bias is refused by name; without the biases (tied
    embeddings, final norm folded into a separate lm_head LoRA) the export is exact."""
    delta_path = tmp_path / "full.delta"
    base, _ = _compress(tiny_pair, "qwen2", delta_path)
    with pytest.raises(PrinmixError, match=r"self_attn\.\w_proj\.bias changed; vLLM 0\.32 serves no LoRA bias"):
        export_lora(base, delta_path, tmp_path / "refused", check=False)
    assert not (tmp_path / "refused").exists()
    lossy = export_lora(base, delta_path, tmp_path / "lossy", dtype=torch.float32, allow_lossy=True)
    assert all(n.endswith(".bias") for n in lossy["left_out"]) and lossy["left_out"]
    assert lossy["whole_model"]["adapter_vs_merge"]["rel_logit_error"] > 1e-3     # the cost is measured, not hidden
    delta = load_delta(delta_path)
    for name in [n for n in delta.dense if n.endswith(".bias")]:
        del delta.dense[name]
    no_bias = tmp_path / "nobias.delta"
    save_delta(delta, no_bias)
    report = export_lora(base, no_bias, tmp_path / "lora", dtype=torch.float32, check=False)
    assert report["modules"]["lm_head"]["folded_norm"]
    ref = _merged_logits(base, no_bias, tmp_path / "merged")
    assert torch.allclose(_peft_logits(base, tmp_path / "lora", IDS), ref, atol=1e-4, rtol=1e-4)


def test_residual_norms_and_added_vocabulary_refused(tiny_models, tiny_pair, tmp_path):
    from fixtures.more_architectures import MoreArchitectures

    base, ft = MoreArchitectures(tiny_models).pair("gemma2")
    api.compress(base, ft, tmp_path / "g.delta", ratio="1/8", method="deltacome", device="cpu", calibration=CalibrationConfig(nsamples=2, seqlen=32))
    with pytest.raises(PrinmixError, match=r"post_\w+layernorm.weight: changed, and this norm normalises"):
        export_lora(base, tmp_path / "g.delta", tmp_path / "g", check=False)

    delta_path = tmp_path / "llama.delta"
    base, _ = _compress(tiny_pair, "llama", delta_path, exact_embeddings=True)   # exact rows, to add one
    delta = load_delta(delta_path)
    idx, values, shape = delta.rows["model.embed_tokens.weight"]
    delta.rows["model.embed_tokens.weight"] = (torch.cat([idx, torch.tensor([shape[0]])]),
                                               torch.cat([values, values[:1]]), [shape[0] + 1, shape[1]])
    save_delta(delta, tmp_path / "vocab.delta")
    with pytest.raises(PrinmixError, match="added vocabulary"):
        export_lora(base, tmp_path / "vocab.delta", tmp_path / "v", allow_lossy=True, check=False)


def test_norm_fold_identity_and_refusals():
    """W_eff = W_ft diag(ρ) satisfies W_eff diag(g_base) = W_ft diag(g_ft) (Gemma: g = 1 + γ); zero base
    weights and residual norms are refused."""
    g = torch.Generator().manual_seed(0)
    w_ft = torch.randn(6, 5, generator=g, dtype=torch.float64)
    for model_type, offset in (("llama", 0.0), ("gemma2", 1.0)):
        gb, gf = torch.rand(5, generator=g, dtype=torch.float64) + 0.5, torch.rand(5, generator=g, dtype=torch.float64)
        rho = norm_ratio(model_type, "n", gb, gf)
        assert torch.allclose(w_ft * rho * (gb + offset), w_ft * (gf + offset), atol=1e-12)
    with pytest.raises(NormFoldError, match="impossible"):
        norm_ratio("llama", "n", torch.tensor([1.0, 0.0]), torch.tensor([1.0, 0.5]))
    assert norm_ratio("llama", "n", torch.tensor([0.0]), torch.tensor([0.0])).item() == 1.0
    assert fold_targets("llama", "model.layers.3.post_attention_layernorm.weight") == [
        "model.layers.3.mlp.gate_proj.weight", "model.layers.3.mlp.up_proj.weight"]
    assert fold_targets("qwen2", "model.norm.weight") == ["lm_head.weight"]
    with pytest.raises(NormFoldError, match="does not know"):
        fold_targets("mixtral", "model.layers.0.input_layernorm.weight")
    with pytest.raises(NormFoldError, match="q_proj's output"):
        fold_targets("gemma3_text", "model.layers.0.self_attn.q_norm.weight")


def test_factors_of_rows_is_an_exact_svd():
    g = torch.Generator().manual_seed(1)
    delta = torch.zeros(40, 6, dtype=torch.float64)
    delta[[3, 17, 30]] = torch.randn(3, 6, generator=g, dtype=torch.float64)
    u_s, vh = factors_of_rows(delta)
    assert u_s.shape == (40, 3) and torch.allclose(u_s @ vh, delta, atol=1e-12)
    assert torch.allclose(vh @ vh.T, torch.eye(3, dtype=torch.float64), atol=1e-12)


def test_row_delta_factors_of_compressed_rows_equal_the_dense_difference(tiny_pair, tmp_path):
    """Compressed embedding rows: L·R (the stored factors scattered to their rows, no SVD) equals the
    float64 dense reference E_ft − E_base with E_ft = base + ΔŴ built row by row from reconstruct()."""
    delta_path = tmp_path / "whole.delta"
    base, _ = _compress(tiny_pair, "llama", delta_path)
    delta = load_delta(delta_path)
    emb = "model.embed_tokens.weight"
    idx, m, shape = delta.vocab[emb]
    left, right = row_delta_factors(emb, CheckpointReader(base), delta)
    reference = torch.zeros(shape, dtype=torch.float64)
    reference[idx] = m.reconstruct(torch.float64)
    assert left.dtype == right.dtype == torch.float64 and left.shape == (shape[0], m.rank)
    assert torch.allclose(left @ right, reference, rtol=0, atol=1e-6 * float(reference.abs().max()))
    untouched = torch.ones(shape[0], dtype=torch.bool)
    untouched[idx] = False
    assert not left[untouched].any()


def test_fold_norm_is_exact_and_in_svd_form():
    """fold_norm against the dense float64 product B·A·diag(ρ) + W·diag(ρ − 1); its first r ranks are
    the best rank-r approximation (Eckart–Young, dense SVD)."""
    g = torch.Generator().manual_seed(2)
    b, a = torch.randn(12, 3, generator=g, dtype=torch.float64), torch.randn(3, 9, generator=g, dtype=torch.float64)
    w = torch.randn(12, 9, generator=g, dtype=torch.float64)
    rho = torch.ones(9, dtype=torch.float64)
    rho[[1, 4, 5, 8]] = torch.rand(4, generator=g, dtype=torch.float64) + 0.5
    m = fold_norm(b, a, w, rho)
    dense = b @ a * rho + w * (rho - 1)
    assert m.folded and m.svd_form and m.a.shape[0] == 7                # rank(B·A) + |{ρ ≠ 1}| ≤ min(12, 9)
    assert torch.allclose(m.b @ m.a, dense, atol=1e-12)
    u, s, vh = torch.linalg.svd(dense)
    for r in (1, 4, 6):
        assert torch.allclose(m.b[:, :r] @ m.a[:r], (u[:, :r] * s[:r]) @ vh[:r], atol=1e-10)


def test_cli_says_when_vllm_cannot_serve_the_rank(pair, tmp_path, capsys, monkeypatch):
    """r above vLLM's largest --max-lora-rank (a folded d = 576 model exported without --max-rank): the
    command says so and how to export a servable adapter instead of printing a serve line vLLM refuses."""
    base, _, linear_only, _ = pair
    real = lora_module.export_lora

    def too_wide(*args, **kwargs):
        report = real(*args, **kwargs)
        return {**report, "r": 576, "vllm_max_lora_rank": None}

    monkeypatch.setattr(lora_module, "export_lora", too_wide)
    parser = argparse.ArgumentParser(prog="prinmix")
    add_export_lora_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["export-lora", str(base), str(linear_only), "-o", str(tmp_path / "wide"), "--no-check"])
    assert args.fn(args) == 0
    out = capsys.readouterr().out
    assert "vLLM cannot serve this adapter: r = 576" in out and "--max-rank 512" in out and "--enable-lora" not in out
