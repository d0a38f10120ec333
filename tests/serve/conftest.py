"""Serve fixtures: the tiny llama base with two delta tenants, and the main server over them (runtime
loading on from the deltas' directory, a chat template, max 4 tenants)."""

import pytest
from server_helpers import CHAT_TEMPLATE, MAX_LEN, TENANTS, running
from transformers import AutoModelForCausalLM, AutoTokenizer

from prinmix import api
from prinmix.api import CalibrationConfig
from prinmix.serve.app import load_app
from prinmix.serve.config import ServerConfig


@pytest.fixture(scope="session")
def llama(tiny_pair, tmp_path_factory):
    """(base dir, {tenant: delta path}, {model name: merged model}, tokenizer)."""
    base, ft = tiny_pair("llama")
    work = tmp_path_factory.mktemp("serve")
    calib = work / "calib.txt"
    calib.write_text("\n".join(f"{a}+{a + 7}={2 * a + 7}" for a in range(300)))
    deltas, refs = {}, {"base": AutoModelForCausalLM.from_pretrained(base).eval()}
    (work / "deltas").mkdir()
    for name, (method, ratio) in TENANTS.items():
        deltas[name] = work / "deltas" / f"{name}.delta"
        api.compress(base, ft, deltas[name], ratio=ratio, method=method, device="cpu",
                     calibration=CalibrationConfig(calib=str(calib), nsamples=4, seqlen=32))
        refs[name] = AutoModelForCausalLM.from_pretrained(api.merge(base, deltas[name], work / f"m_{name}")).eval()
    return base, deltas, refs, AutoTokenizer.from_pretrained(base)


def make_app(llama, logs=None, **settings):
    base, deltas, _, _ = llama
    config = ServerConfig(**{"max_batch": 8, "max_model_len": MAX_LEN, "base_name": "base", **settings})
    return load_app(base, {n: str(p) for n, p in deltas.items()}, device="cpu", config=config,
                    log=(logs.append if logs is not None else lambda _line: None))


@pytest.fixture(scope="session")
def server(llama):
    logs = []
    deltas = llama[1]
    app = make_app(llama, logs, allow_runtime_loading=True, runtime_delta_dirs=[str(deltas["low"].parent)],
                   max_tenants=4, chat_template=CHAT_TEMPLATE)
    with running(app) as s:
        s.logs = logs
        yield s
