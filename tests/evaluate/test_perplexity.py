"""Strided perplexity equals exp(mean NLL) computed by hand from the logits."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fixtures.tiny_models import single_thread
from prinmix import api
from prinmix.errors import PrinmixError
from prinmix.evaluate.perplexity import load_model, perplexity, strided_windows, text_token_ids
from prinmix.evaluate.results import format_results, load_eval_json, write_results
from prinmix.evaluate.run import EvalConfig, run_eval


@pytest.fixture(autouse=True)
def one_thread():
    with single_thread():
        yield


@pytest.fixture(scope="module")
def ft_model(tiny_pair):
    _, ft = tiny_pair("llama")
    return load_model(ft, "cpu", "float32")


def test_disjoint_windows_equal_exp_mean_nll(ft_model):
    model, tok = ft_model
    ids = text_token_ids(None, tok, 40)
    assert ids.shape == (40,)
    with torch.no_grad():
        logits = model(input_ids=ids[None]).logits[0].double()
    nll = -torch.log_softmax(logits[:-1], -1).gather(1, ids[1:, None]).mean()
    r = perplexity(model, ids, seqlen=40)
    assert r.tokens == 39 and r.windows == 1
    assert r.ppl == pytest.approx(math.exp(float(nll)), rel=1e-5)
    # two disjoint windows: the first token of the second window has no context and is not scored
    ids2 = text_token_ids(None, tok, 60)
    r2 = perplexity(model, ids2, seqlen=30, stride=30)
    total = 0.0
    for begin in (0, 30):
        with torch.no_grad():
            lg = model(input_ids=ids2[None, begin:begin + 30]).logits[0].double()
        w = ids2[begin:begin + 30]
        total += float(-torch.log_softmax(lg[:-1], -1).gather(1, w[1:, None]).sum())
    assert r2.tokens == 58
    assert r2.ppl == pytest.approx(math.exp(total / 58), rel=1e-5)


def test_overlapping_windows_score_every_token_once_with_its_window_context(ft_model):
    model, tok = ft_model
    ids = text_token_ids(None, tok, 37)
    seqlen, stride = 16, 6
    windows = strided_windows(ids.numel(), seqlen, stride)
    assert sum(n for _, _, n in windows) == 37 and windows[-1][1] == 37
    # by hand: token t is scored by the window whose scored span holds it, with context from that window's start
    total, count = 0.0, 0
    prev_end = 0
    for begin, end, n in windows:
        for t in range(max(end - n, 1), end):
            with torch.no_grad():
                lg = model(input_ids=ids[None, begin:t]).logits[0, -1].double()
            total -= float(torch.log_softmax(lg, -1)[ids[t]])
            count += 1
        assert end - n == prev_end
        prev_end = end
    r = perplexity(model, ids, seqlen=seqlen, stride=stride)
    assert r.tokens == count == 36
    assert r.ppl == pytest.approx(math.exp(total / count), rel=1e-5)


def test_bad_settings(ft_model):
    model, tok = ft_model
    with pytest.raises(PrinmixError, match="stride"):
        strided_windows(100, 16, 17)
    with pytest.raises(PrinmixError, match="vocabulary"):
        perplexity(model, torch.tensor([1, 2, 10_000]), seqlen=3)
    with pytest.raises(PrinmixError, match="no such calibration file"):
        text_token_ids("/nonexistent/text.txt", tok)


def test_run_eval_side_by_side(tiny_pair, tmp_path):
    base, ft = tiny_pair("llama")
    delta = tmp_path / "low.safetensors"
    api.compress(base, ft, delta, ratio="1/8", method="lowrank", device="cpu")
    res = run_eval(base, [delta], finetuned=ft, config=EvalConfig(metrics="error,ppl", nsamples=2, seqlen=16, ppl_tokens=200, ppl_seqlen=64, device="cpu"))
    ppl = res["perplexity"]["results"]
    assert set(ppl) == {"base", "finetuned", "low"}
    model, _ = load_model(ft, "cpu", "float32")
    ids = text_token_ids(None, load_model(ft)[1], 200)
    assert ppl["finetuned"]["ppl"] == pytest.approx(perplexity(model, ids, 64).ppl, rel=1e-6)
    assert ppl["low"]["ppl"] != ppl["finetuned"]["ppl"]
    assert res["models"][2]["method"] == "lowrank" and res["models"][2]["ratio_achieved"] > 0
    assert "low" in res["layer_error"]["summary"]
    text = format_results(res, per_type=True)
    assert "eq1_all" in text and "ppl" in text and "high/out" in text
    files = write_results(res, tmp_path / "out" / "results.json")
    assert [f.name for f in files] == ["results.json", "results.csv", "results.layers.csv"]
    assert load_eval_json(files[0])["perplexity"]["results"]["low"]["ppl"] == ppl["low"]["ppl"]
    assert json.loads(files[0].read_text())["prinmix_eval"] == 1
    with pytest.raises(PrinmixError, match="needs --finetuned"):
        run_eval(base, [delta], config=EvalConfig(metrics="error", device="cpu"))
    with pytest.raises(PrinmixError, match="--ppl-seqlen must be a positive integer"):
        run_eval(base, [delta], config=EvalConfig(metrics="ppl", ppl_seqlen=0, device="cpu"))
