"""Eq. 1 layer errors against a direct float64 computation on a tiny real fine-tune."""

from __future__ import annotations

import math

import pytest
import torch

from fixtures.tiny_models import single_thread
from prinmix import api
from prinmix.calibration.data import load_calibration
from prinmix.errors import BaseMismatchError, DeltaFormatError
from prinmix.evaluate.layer_error import (
    GROUPS,
    HELD_OUT_SEED,
    depth_group,
    format_summary_table,
    format_type_table,
    layer_errors,
    projection_type,
)
from prinmix.format.delta_file import load_delta

NSAMPLES, SEQLEN = 4, 32


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def qwen_setup(tiny_pair, tmp_path_factory):
    base, ft = tiny_pair("qwen2")
    out = tmp_path_factory.mktemp("eq1")
    deltas = {}
    with single_thread():
        for method, ratio in (("lowrank", "1/8"), ("bitdelta", "1/16")):
            deltas[method] = out / f"{method}.safetensors"
            api.compress(base, ft, deltas[method], ratio=ratio, method=method, device="cpu")
        result = layer_errors(base, ft, deltas, nsamples=NSAMPLES, seqlen=SEQLEN, device="cpu", batch_size=3)
    return base, ft, deltas, result


def _direct(base, ft, delta_path, names):
    """{weight name: (sse, ssd, n, out_sse, out_n)} from a float64 HF forward of the fine-tune with hooks."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(ft))
    ids = load_calibration(None, tok, NSAMPLES, SEQLEN, HELD_OUT_SEED)
    model = AutoModelForCausalLM.from_pretrained(str(ft), dtype=torch.float64).eval()
    base_sd = load_file(str(base / "model.safetensors"))
    delta = load_delta(delta_path)
    captured = {}
    modules = dict(model.named_modules())
    handles = []
    for name in names:
        mod = modules[name[: -len(".weight")]]
        handles.append(mod.register_forward_hook(
            lambda m, a, o, _n=name: captured.setdefault(_n, []).append((a[0].detach(), o.detach()))))
    with torch.no_grad():
        model(input_ids=ids)
    for h in handles:
        h.remove()
    out = {}
    for name in names:
        (x, y), = captured[name]
        x = x.reshape(-1, x.shape[-1])
        w_ft = modules[name[: -len(".weight")]].weight.detach()
        dw = w_ft - base_sd[name].double()
        dw_hat = delta.matrices[name].reconstruct(torch.float64)
        e2 = (x @ (dw - dw_hat).T).square().reshape(-1)
        d2 = (x @ dw.T).square().reshape(-1)
        k = math.ceil(0.01 * e2.numel())
        top = torch.topk(y.reshape(-1).abs(), k).indices
        out[name] = (float(e2.sum()), float(d2.sum()), e2.numel(), float(e2[top].sum()), k,
                     float(d2[top].sum()))
    return out


@pytest.mark.parametrize("method", ["lowrank", "bitdelta"])
def test_matches_direct_float64_computation(qwen_setup, method):
    base, ft, deltas, result = qwen_setup
    recs = {r.name: r for r in result.records if r.delta == method}
    assert len(recs) == len(load_delta(deltas[method]).matrices) == 3 * 7
    direct = _direct(base, ft, deltas[method], sorted(recs))
    for name, (sse, ssd, n, out_sse, out_n, out_ssd) in direct.items():
        r = recs[name]
        assert r.n == n and r.out_n == out_n
        m = r.metrics()
        assert m["all"] == pytest.approx(sse / n, rel=1e-4), name
        assert m["rel"] == pytest.approx(sse / ssd, rel=1e-4), name
        # the top-1% set is chosen from float32 vs float64 outputs: allow a boundary swap
        assert m["out"] == pytest.approx(out_sse / out_n, rel=2e-3), name
        assert m["out_rel"] == pytest.approx(out_sse / out_ssd, rel=2e-3), name
        assert r.type == projection_type(name) and r.group == depth_group(r.layer, 3)


def test_aggregation_follows_table_15(qwen_setup):
    _, _, _, result = qwen_setup
    d = result.to_dict()
    assert d["groups"] == {"low": [0], "mid": [1], "high": [2]}
    by_type, summary = d["by_type"], d["summary"]
    for label in ("lowrank", "bitdelta"):
        assert list(by_type[label]) == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        recs = [r for r in result.records if r.delta == label]
        for g in GROUPS + ("all",):
            for metric in ("all", "out", "rel"):
                per_type = []
                for t in by_type[label]:
                    vals = [r.metrics()[metric] for r in recs if r.type == t and (g == "all" or r.group == g)]
                    assert by_type[label][t][g][metric] == pytest.approx(sum(vals) / len(vals))
                    per_type.append(sum(vals) / len(vals))
                assert summary[label][g][metric] == pytest.approx(sum(per_type) / len(per_type))
    # BitDelta's sign matrix loses more than a 1/8 low-rank delta on this fine-tune; both lose something
    assert 0 < summary["lowrank"]["all"]["rel"] < 1
    assert summary["bitdelta"]["all"]["rel"] > 0
    table = format_summary_table(summary)
    assert "low/all" in table and "lowrank" in table and "bitdelta" in table
    assert "q_proj" in format_type_table(by_type, "out")
    assert "lowrank" in result.records_csv().splitlines()[1]


def test_depth_groups_follow_the_paper():
    groups = [depth_group(i, 28) for i in range(28)]
    assert groups.count("low") == 9 and groups.count("mid") == 9 and groups.count("high") == 10
    assert groups[8] == "low" and groups[9] == "mid" and groups[17] == "mid" and groups[18] == "high"
    assert projection_type("model.layers.3.mlp.down_proj.weight") == "down_proj"


def test_bad_inputs(qwen_setup, tiny_pair, tmp_path):
    base, ft, deltas, _ = qwen_setup
    with pytest.raises(DeltaFormatError, match="no such delta file"):
        layer_errors(base, ft, [tmp_path / "missing.safetensors"], nsamples=1, seqlen=8, device="cpu")
    llama_base, llama_ft = tiny_pair("llama")
    with pytest.raises(BaseMismatchError):
        layer_errors(llama_base, llama_ft, [deltas["lowrank"]], nsamples=1, seqlen=8, device="cpu")
