"""The OpenAI surface (issue 16 item 4) through the real `openai` client: sampling fields, n, logprobs, refusals
naming the field, the chat template requirement, /metrics (Prometheus) and /version."""

import json
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from server_helpers import is_error_shape, post, request, running

import prinmix
from conftest import make_app

PROMPT = "7+8="


def _text(server, top_k=None, **kw):
    extra = {"top_k": top_k} if top_k is not None else None          # vLLM's field, not in OpenAI's signature
    return server.client.completions.create(model="low", prompt=PROMPT, max_tokens=10, extra_body=extra,
                                            **kw).choices[0].text


def test_a_seeded_request_is_reproducible_alone_and_batched(server):
    sampled = {"temperature": 1.0, "top_p": 0.95, "seed": 11}
    alone = [_text(server, **sampled) for _ in range(2)]
    assert alone[0] == alone[1]
    sched = server.scheduler
    sched.pause()                                      # the same request decoded together with two others
    try:
        with ThreadPoolExecutor(3) as pool:
            mine = pool.submit(_text, server, **sampled)
            others = [pool.submit(_text, server, temperature=1.3, seed=5), pool.submit(_text, server, temperature=0)]
            while sched.num_waiting < 3:
                time.sleep(0.01)
            sched.resume()
            batched = mine.result()
            [f.result() for f in others]
    finally:
        sched.resume()
    assert batched == alone[0]
    assert len({_text(server, temperature=1.5, seed=s) for s in range(8)}) > 1       # seeds do change samples


def test_greedy_limits_of_sampling(server):
    greedy = _text(server, temperature=0)
    assert _text(server, temperature=1.0, top_k=1, seed=3) == greedy
    assert _text(server, temperature=1.0, top_p=1e-6, seed=3) == greedy
    assert _text(server, temperature=1e-5, seed=3) == greedy


def test_n_choices_equal_single_requests_with_consecutive_seeds(server):
    c = server.client
    many = c.completions.create(model="low", prompt=PROMPT, max_tokens=8, n=3, seed=40, temperature=1.2)
    assert [ch.index for ch in many.choices] == [0, 1, 2]
    single = [c.completions.create(model="low", prompt=PROMPT, max_tokens=8, seed=40 + i, temperature=1.2)
              for i in range(3)]
    assert [ch.text for ch in many.choices] == [s.choices[0].text for s in single]
    assert many.usage.completion_tokens == sum(s.usage.completion_tokens for s in single)
    streamed = {}
    for chunk in c.completions.create(model="low", prompt=PROMPT, max_tokens=8, n=3, seed=40, temperature=1.2,
                                      stream=True):
        for ch in chunk.choices:
            streamed[ch.index] = streamed.get(ch.index, "") + ch.text
    assert [streamed[i] for i in range(3)] == [ch.text for ch in many.choices]
    chat = c.chat.completions.create(model="bit", messages=[{"role": "user", "content": "2+2="}], max_tokens=5, n=2,
                                     temperature=0)
    assert len(chat.choices) == 2 and chat.choices[0].message.content == chat.choices[1].message.content


def test_logprobs_match_the_merged_model(server, llama):
    _, _, refs, tok = llama
    r = server.client.completions.create(model="low", prompt=PROMPT, max_tokens=4, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    ids = tok(PROMPT)["input_ids"]
    with torch.no_grad():
        first = torch.log_softmax(refs["low"](torch.tensor([ids])).logits[0, -1].double(), -1)
    best = first.topk(3)
    assert lp.token_logprobs[0] == pytest.approx(best.values[0].item(), abs=1e-3)
    assert list(lp.top_logprobs[0].values()) == pytest.approx(best.values.tolist(), abs=1e-3)
    assert "".join(lp.tokens) == r.choices[0].text and lp.text_offset[0] == 0
    assert len(lp.tokens) == r.usage.completion_tokens or r.choices[0].finish_reason == "stop"
    chat = server.client.chat.completions.create(model="bit", messages=[{"role": "user", "content": "1+2="}],
                                                 max_tokens=3, temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert content and all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)
    assert all(t.logprob == pytest.approx(t.top_logprobs[0].logprob, abs=1e-6) for t in content)   # greedy = top
    streamed = list(server.client.completions.create(model="low", prompt=PROMPT, max_tokens=4, temperature=0,
                                                     logprobs=1, stream=True))
    tokens = [t for ch in streamed for t in (ch.choices[0].logprobs.tokens if ch.choices[0].logprobs else [])]
    assert tokens == lp.tokens


@pytest.mark.parametrize("field, value", [("presence_penalty", 0.5), ("frequency_penalty", -1.0),
                                          ("logit_bias", {"5": 10}), ("echo", True), ("suffix", "x"),
                                          ("best_of", 3), ("min_p", 0.1), ("n", 17), ("top_p", 0), ("top_k", -2),
                                          ("temperature", 3), ("logprobs", 21), ("tools", []),
                                          ("stop", ["@"] * 17), ("stop", "x" * 257)])
def test_unsupported_completion_fields_are_refused_by_name(server, field, value):
    with pytest.raises(openai.BadRequestError) as e:
        server.client.completions.create(model="low", prompt=PROMPT, max_tokens=2, extra_body={field: value})
    assert e.value.response.json()["error"]["param"] == field


@pytest.mark.parametrize("body, field", [({"top_logprobs": 2}, "top_logprobs"),
                                         ({"response_format": {"type": "json_object"}}, "response_format"),
                                         ({"messages": [{"role": "user", "content": [
                                             {"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages"),
                                         ({"messages": [{"role": "tool", "content": "x"}]}, "messages")])
def test_unsupported_chat_fields_are_refused_by_name(server, body, field):
    full = {"model": "bit", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **body}
    status, answer = post(f"{server.url}/v1/chat/completions", json.dumps(full).encode())
    assert status == 400 and is_error_shape(answer) and answer["error"]["param"] == field


def test_chat_without_a_template_is_refused(llama):
    with running(make_app(llama)) as s:                       # the tiny tokenizer has no chat template
        with pytest.raises(openai.BadRequestError) as e:
            s.client.chat.completions.create(model="low", messages=[{"role": "user", "content": "hi"}])
        assert e.value.code == "chat_template_missing" and "--chat-template" in e.value.message


def test_metrics_and_version(server):
    server.client.completions.create(model="low", prompt=PROMPT, max_tokens=3, temperature=0)
    status, text = request(f"{server.url}/metrics")
    assert status == 200
    families = {f.name: f for f in text_string_to_metric_families(text)}
    value = {f.name: {(s.name, tuple(sorted(s.labels.items()))): s.value for s in f.samples}
             for f in families.values()}
    stats = server.scheduler.stats
    assert value["prinmix_generation_tokens"][("prinmix_generation_tokens_total", ())] >= 3
    assert value["prinmix_prompt_tokens"][("prinmix_prompt_tokens_total", ())] == stats.prompt_tokens
    assert value["prinmix_tenants_registered"][("prinmix_tenants_registered", ())] == 2
    assert value["prinmix_tenants_resident"][("prinmix_tenants_resident", ())] == 2
    assert value["prinmix_num_requests_waiting"][("prinmix_num_requests_waiting", ())] == 0
    count = value["prinmix_batch_size"][("prinmix_batch_size_count", ())]
    assert count == stats.steps and value["prinmix_batch_size"][("prinmix_batch_size_bucket", (("le", "+Inf"),))] \
        == stats.steps
    ok = ("prinmix_http_requests_total", (("endpoint", "/v1/completions"), ("status", "200")))
    assert value["prinmix_http_requests"][ok] >= 1
    assert request(f"{server.url}/version") == (200, {"version": prinmix.__version__})
