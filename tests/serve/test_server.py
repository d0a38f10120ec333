"""prinmix serve: the OpenAI-compatible server over the tiny llama base and two delta tenants, driven by the
real `openai` client. Answers equal greedy `generate` of the merged checkpoints; tenants and the base share
forward passes; streaming, chat, errors and run-time load/unload work. The server fixtures live in
tests/serve/conftest.py."""

import json
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch
from server_helpers import CHAT_TEMPLATE, MAX_LEN, PROMPTS, is_error_shape, post, running

from conftest import make_app
from prinmix.cli import build_parser
from prinmix.cli.serve import server_config
from prinmix.errors import PrinmixError
from prinmix.serve.config import ServerConfig
from prinmix.serve.text_stream import TextStream


def _greedy_text(model, tokenizer, ids, n):
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=n, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)


def test_text_stream_pieces_add_up(tiny_tokenizer):
    text = "12+35=47 naïve ✓ done"
    ids = tiny_tokenizer(text)["input_ids"]
    stream = TextStream(tiny_tokenizer, [])
    pieces = [stream.update(ids[:i], final=i == len(ids))[0] for i in range(1, len(ids) + 1)]
    assert "".join(pieces) == tiny_tokenizer.decode(ids) and all("\ufffd" not in p for p in pieces)
    stream = TextStream(tiny_tokenizer, ["ve ✓", "zz"])
    out, stopped = "", False
    for i in range(1, len(ids) + 1):
        piece, stopped = stream.update(ids[:i])
        out += piece
        if stopped:
            break
    assert stopped and out == "12+35=47 naï"


def test_models_and_startup_log(server):
    ids = {m.id for m in server.client.models.list()}
    assert ids == {"base", "low", "bit"}
    assert any("'low'" in line and "resident" in line for line in server.logs)


def test_tenants_and_base_decode_together_and_match_merged_models(server, llama):
    _, _, refs, tok = llama
    sched = server.scheduler
    steps_before = sched.stats.steps
    sched.pause()                                      # all three queue up, then are admitted together
    try:
        with ThreadPoolExecutor(3) as pool:
            futures = {m: pool.submit(server.client.completions.create, model=m, prompt=PROMPTS[m], max_tokens=8,
                                      temperature=0) for m in PROMPTS}
            deadline = time.time() + 30
            while sched.num_waiting < 3 and time.time() < deadline:
                time.sleep(0.01)
            sched.resume()
            answers = {m: f.result() for m, f in futures.items()}
    finally:
        sched.resume()
    for m, r in answers.items():
        ids = tok(PROMPTS[m])["input_ids"]
        assert r.choices[0].text == _greedy_text(refs[m], tok, ids, 8), m
        assert r.usage.prompt_tokens == len(ids) and r.model == m
        assert r.usage.completion_tokens <= 8
    mixes = [set(models) for _, models in list(sched.stats.recent_steps)[-(sched.stats.steps - steps_before):]]
    assert any(mix == {"base", "low", "bit"} for mix in mixes)           # one forward pass for all three
    assert sched.stats.max_batch_seen >= 3


def test_streaming_chat_and_stop_strings(server, llama):
    _, _, refs, tok = llama
    c = server.client
    full = c.completions.create(model="low", prompt=PROMPTS["low"], max_tokens=12, temperature=0)
    text = full.choices[0].text
    chunks = list(c.completions.create(model="low", prompt=PROMPTS["low"], max_tokens=12, stream=True, temperature=0))
    assert "".join(ch.choices[0].text for ch in chunks) == text
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
    assert text
    # a 2-char stop string first occurring mid-text; a tiny model that only emits one repeated character
    # (e.g. newlines) has none, and then the first character is the stop string
    cut = next((i for i in range(1, len(text) - 1) if text.find(text[i:i + 2]) == i), None)
    stop, cut = (text[cut:cut + 2], cut) if cut is not None else (text[:1], 0)
    stopped = c.completions.create(model="low", prompt=PROMPTS["low"], max_tokens=12, stop=["@@", stop],
                                   temperature=0)
    assert stopped.choices[0].text == text[:cut] and stopped.choices[0].finish_reason == "stop"
    streamed = c.completions.create(model="low", prompt=PROMPTS["low"], max_tokens=12, stop=stop, stream=True,
                                    temperature=0)
    assert "".join(ch.choices[0].text for ch in streamed) == text[:cut]

    messages = [{"role": "user", "content": "3+4="}]
    chat = c.chat.completions.create(model="bit", messages=messages, max_tokens=6, temperature=0)
    text = tok.apply_chat_template(messages, chat_template=CHAT_TEMPLATE, tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False)["input_ids"]                 # the server's --chat-template
    assert chat.choices[0].message.content == _greedy_text(refs["bit"], tok, ids, 6)
    assert chat.usage.prompt_tokens == len(ids)
    parts = list(c.chat.completions.create(model="bit", messages=messages, max_tokens=6, stream=True,
                                           stream_options={"include_usage": True}, temperature=0))
    assert parts[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in parts if p.choices) == chat.choices[0].message.content
    assert parts[-1].usage.completion_tokens == chat.usage.completion_tokens


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server):
    c = server.client
    with pytest.raises(openai.NotFoundError) as e:
        c.completions.create(model="nope", prompt="hi", max_tokens=2)
    assert is_error_shape(e.value.response.json()) and e.value.code == "model_not_found"
    status, body = post(f"{server.url}/v1/completions", b'{"model": "base", "prompt": ')
    assert status == 400 and is_error_shape(body)
    status, body = post(f"{server.url}/v1/chat/completions", json.dumps({"messages": []}).encode())
    assert status == 400 and is_error_shape(body)
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="base", prompt=[5] * (MAX_LEN + 1), max_tokens=2)
    assert e.value.code == "context_length_exceeded"
    assert c.completions.create(model="bit", prompt="1+1=", max_tokens=2).choices[0].finish_reason


def test_load_and_unload_at_run_time(server, llama):
    _, deltas, _, _ = llama
    c, url, sched = server.client, server.url, server.scheduler
    status, _ = post(f"{url}/v1/load_lora_adapter", json.dumps({"lora_name": "low2",
                                                                  "lora_path": str(deltas["low"])}).encode())
    assert status == 200 and "low2" in {m.id for m in c.models.list()}
    same = [c.completions.create(model=m, prompt="5+5=", max_tokens=5, temperature=0).choices[0].text
            for m in ("low", "low2")]
    assert same[0] == same[1]
    status, body = post(f"{url}/v1/load_lora_adapter", json.dumps({"lora_name": "x", "lora_path": "/no"}).encode())
    assert status == 400 and is_error_shape(body)

    sched.pause()                                      # a queued request for low2 makes its unload a 409
    try:
        with ThreadPoolExecutor(2) as pool:
            gen = pool.submit(c.completions.create, model="low2", prompt="5+5=", max_tokens=3)
            while sched.num_waiting < 1:
                time.sleep(0.01)
            busy = pool.submit(post, f"{url}/v1/unload_lora_adapter", json.dumps({"lora_name": "low2"}).encode())
            while sched.num_pending_controls < 1:
                time.sleep(0.01)
            sched.resume()
            assert busy.result()[0] == 409 and gen.result().choices[0].text
    finally:
        sched.resume()
    status, _ = post(f"{url}/v1/unload_lora_adapter", json.dumps({"lora_name": "low2"}).encode())
    assert status == 200 and "low2" not in {m.id for m in c.models.list()}
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="low2", prompt="5+5=", max_tokens=2)
    assert post(f"{url}/v1/unload_lora_adapter", json.dumps({"lora_name": "low2"}).encode())[0] == 404


def test_dtype_flag_sets_the_base_and_compute_dtype(server, llama):
    assert {p.dtype for p in server.scheduler.model.model.parameters()} == {torch.float32}  # auto: the checkpoint's
    base = str(llama[0])
    config = server_config(build_parser().parse_args(["serve", base, "--dtype", "bfloat16"]))
    assert config.dtype == "bfloat16"
    with running(make_app(llama, dtype=config.dtype)) as s:
        assert {p.dtype for p in s.scheduler.model.model.parameters()} == {torch.bfloat16}
        for model in ("base", "low", "bit"):
            answer = s.client.completions.create(model=model, prompt=PROMPTS[model], max_tokens=4, temperature=0)
            assert answer.usage.completion_tokens == 4 or answer.choices[0].finish_reason == "stop"
    with pytest.raises(PrinmixError, match="--dtype 'int8'"):
        ServerConfig(dtype="int8").check()
