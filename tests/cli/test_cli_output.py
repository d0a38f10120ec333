"""What the CLI prints around the work: one warning when --seqlen is clamped, no library chatter."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from fixtures.tiny_models import single_thread
from prinmix import api
from prinmix.cli import main
from prinmix.format.delta_file import read_metadata


@pytest.fixture(autouse=True)
def one_thread():
    with single_thread():
        yield


def test_seqlen_longer_than_the_context_is_clamped_with_one_warning(tiny_pair, tmp_path):
    base, ft = tiny_pair("llama")  # max_position_embeddings 256
    with pytest.warns(UserWarning, match="--seqlen 2048 exceeds the model's context length of 256 tokens") as w:
        s = api.compress(base, ft, tmp_path / "d.delta", method="deltacome", device="cpu",
                         calibration=api.CalibrationConfig(nsamples=2, seqlen=2048))
    assert len([x for x in w if "context length" in str(x.message)]) == 1
    assert api.info(s.path).base["model_type"] == "llama"
    assert read_metadata(s.path)["params"]["seqlen"] == 256  # what was run is what is recorded


def test_demo_commands_print_no_library_warnings_or_bars(tiny_pair, tmp_path, capfd, monkeypatch):
    monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "error")  # what main() sets; restored after the test
    base, ft = tiny_pair("llama", "bf16")
    delta = tmp_path / "x.delta"
    assert main(["compress", str(base), str(ft), "-o", str(delta), "--nsamples", "2", "--seqlen", "2048"]) == 0
    assert main(["merge", str(base), str(delta), "-o", str(tmp_path / "m")]) == 0
    assert main(["info", str(delta)]) == 0
    assert main(["eval", str(base), str(delta), "--finetuned", str(ft), "--nsamples", "1", "--seqlen", "1024",
                 "--ppl-tokens", "600", "--device", "cpu", "-o", str(tmp_path / "r.json")]) == 0
    out, err = capfd.readouterr()
    # the default split, measured on calibration text and the fine-tune's samples, named in the summary
    assert "measured on calibration text and the fine-tune's own samples: the embedding / lm_head rows get" in out
    for chatter in ("Token indices sequence length", "Loading weights", "Loading checkpoint shards", "[transformers]"):
        assert chatter not in err, chatter
    warnings = [line for line in err.splitlines() if "warning" in line.lower()]
    # the toy model's whole delta ends above --ratio (its matrices' header entries are not charged: whole_budget.py)
    over = [w for w in warnings if w.startswith(f"prinmix: warning: {delta}: the whole delta is stored at ")]
    assert len(over) == 1, err
    warnings.remove(over[0])
    assert warnings == ["prinmix: warning: --seqlen 2048 exceeds the model's context length of 256 tokens; using 256",
                        "prinmix: warning: --seqlen 1024 exceeds the model's context length of 256 tokens; using 256",
                        "prinmix: warning: --ppl-seqlen 512 exceeds the model's context length of 256 tokens; "
                        "using 256"], err
    assert "tensor/s" in err or "tensor]" in err  # merge's bar counts tensors
    assert json.loads((tmp_path / "r.json").read_text())["perplexity"]["settings"]["seqlen"] == 256


FRESH_PROCESS = """
import sys

import uvicorn

from prinmix.cli import main

uvicorn.run = lambda *args, **kwargs: None  # serve: load, warm up and log as at start-up, then return
base, ft, work = sys.argv[1:4]
for argv in (["compress", base, ft, "-o", f"{work}/x.delta", "--nsamples", "2", "--seqlen", "2048"],
             ["merge", base, f"{work}/x.delta", "-o", f"{work}/m"],
             ["info", f"{work}/x.delta"],
             ["eval", base, f"{work}/x.delta", "--finetuned", ft, "--nsamples", "1", "--seqlen", "64",
              "--ppl-tokens", "200", "--ppl-seqlen", "64", "--device", "cpu", "-o", f"{work}/r.json"],
             ["serve", base, f"{work}/x.delta", "--device", "cpu"]):
    assert main(argv) == 0, argv
"""
# a library's warning, deprecation notice or traceback; transformers' loading bars and unnamed bars ("it/s")
LIBRARY_CHATTER = re.compile(r"warn|deprecat|traceback|loading weights|loading checkpoint|token indices|\bit/s|s/it\b",
                             re.IGNORECASE)


def test_demo_commands_and_serve_start_up_write_no_warnings_in_a_fresh_process(tiny_pair, tmp_path):
    """As a user runs them (a new process, Python's default warning filters, no TRANSFORMERS_VERBOSITY):
    compress, merge, info, eval and serve's start-up write prinmix's own bars, log lines and warnings (the
    clamped --seqlen; the toy model's whole delta above --ratio) to stderr, never a library's warning or bar."""
    base, ft = tiny_pair("llama", "bf16")
    env = {k: v for k, v in os.environ.items() if k not in ("TRANSFORMERS_VERBOSITY", "PYTHONWARNINGS")}
    run = subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(base), str(ft), str(tmp_path)],
                         capture_output=True, text=True, env={**env, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [line.strip() for line in run.stderr.replace("\r", "\n").splitlines() if line.strip()]
    assert any(line.startswith("compress:") and "layer" in line for line in lines), run.stderr
    assert any(line.startswith("prinmix serve: base 'base'") for line in lines), run.stderr
    chatter = [line for line in lines if LIBRARY_CHATTER.search(line)
               and " the whole delta is stored at " not in line]   # the toy model's over-budget note (own warning)
    assert chatter == ["prinmix: warning: --seqlen 2048 exceeds the model's context length of 256 tokens; using 256"]
