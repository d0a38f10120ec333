"""The built-in exact-match runner (greedy, batched, left-padded) and the lm-eval bridge's error."""

from __future__ import annotations

import json

import pytest
import torch

from fixtures.tiny_models import single_thread
from prinmix.errors import PrinmixError
from prinmix.evaluate.perplexity import load_model
from prinmix.evaluate.run import EvalConfig, run_eval
from prinmix.evaluate.tasks import (
    exact_match,
    is_task_file,
    lm_eval_available,
    normalise_prediction,
    read_task_file,
    require_lm_eval,
    run_tasks,
)

# Candidate prompts; the tiny *base* (pretrained on the built-in text) continues about half of them with
# a non-empty first line (the tiny fine-tune mostly answers newlines, which the runner reads as "").
CANDIDATES = ["The module", "def", "Return the", "class", "This function", "If the", "The default", "See also",
              "For example", "Raise", "the", "a", "is", "Create a new", "An object", "Note that", "When", "In",
              "Use", "It"]
MAX_NEW = 6


@pytest.fixture(autouse=True)
def one_thread():
    with single_thread():
        yield


@pytest.fixture(scope="module")
def model_and_answers(tiny_pair):
    base, _ = tiny_pair("llama")
    model, tok = load_model(base, "cpu", "float32")
    answers = []
    for p in CANDIDATES:  # greedy continuation of each prompt alone (no padding), first line
        ids = tok(p, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW,
                                 do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        answers.append(normalise_prediction(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)))
    keep = [(p, a) for p, a in zip(CANDIDATES, answers) if a][:6]
    assert len(keep) >= 4, answers
    return model, tok, keep


def _write(path, prompts, answers):
    path.write_text("".join(json.dumps({"prompt": p, "answer": a, "id": i}) + "\n"
                            for i, (p, a) in enumerate(zip(prompts, answers))) + "\n")
    return path


def test_known_answers_score_one_and_wrong_answers_zero(model_and_answers, tmp_path):
    model, tok, keep = model_and_answers
    prompts, good = [p for p, _ in keep], [a for _, a in keep]
    right = _write(tmp_path / "right.jsonl", prompts, [f"  {a} " for a in good])
    # batched with prompts of different token lengths: left padding must not change greedy outputs
    res = run_tasks(model, tok, [str(right)], batch_size=3, max_new_tokens=MAX_NEW)
    assert res["right"]["accuracy"] == 1.0 and res["right"]["n"] == len(prompts)
    assert res["right"]["examples"][0]["prediction"] == good[0]
    wrong = _write(tmp_path / "wrong.jsonl", prompts, [a + "0" for a in good])
    assert exact_match(model, tok, read_task_file(wrong), batch_size=4, max_new_tokens=MAX_NEW).accuracy == 0.0
    half = read_task_file(right, limit=2) + read_task_file(wrong)[2:4]
    r = exact_match(model, tok, half, batch_size=2, max_new_tokens=MAX_NEW)
    assert (r.correct, r.n, r.accuracy) == (2, 4, 0.5)


def test_matching_rule():
    assert normalise_prediction(" 47\n12+3=15") == "47"
    assert normalise_prediction("\n\n 47 \n") == "47"
    assert normalise_prediction(" 47 apples") == "47 apples"
    assert normalise_prediction("") == ""


def test_task_file_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "answer": "b"}\nnot json\n')
    with pytest.raises(PrinmixError, match=r"bad.jsonl:2: not valid JSON"):
        read_task_file(bad)
    bad.write_text('{"prompt": "a"}\n')
    with pytest.raises(PrinmixError, match=r"bad.jsonl:1: expected an object"):
        read_task_file(bad)
    bad.write_text('[1, 2]\n')
    with pytest.raises(PrinmixError, match=r"bad.jsonl:1: expected a JSON object"):
        read_task_file(bad)
    bad.write_bytes(b'{"prompt": "\xff\xfe", "answer": "1"}\n')
    with pytest.raises(PrinmixError, match=r"bad.jsonl: not UTF-8"):
        read_task_file(bad)
    with pytest.raises(PrinmixError, match="no such task file"):
        read_task_file(tmp_path / "missing.jsonl")
    assert is_task_file(str(tmp_path / "missing.jsonl")) and not is_task_file("gsm8k")


@pytest.mark.skipif(lm_eval_available(), reason="lm-eval is installed: the missing-package error cannot occur")
def test_lm_eval_tasks_need_the_optional_package(tiny_pair, tmp_path):
    with pytest.raises(PrinmixError, match="lm-eval"):
        require_lm_eval(["gsm8k"])
    base, ft = tiny_pair("llama")
    delta = tmp_path / "unused.safetensors"
    with pytest.raises(PrinmixError, match="gsm8k.*lm-eval"):  # refused before any model is loaded
        run_eval(base, [delta], finetuned=ft, config=EvalConfig(metrics="tasks", tasks=("gsm8k",), device="cpu"))
