"""What the CLI prints around the work: one warning when --seqlen is clamped, no library chatter."""

from __future__ import annotations

import json

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
    err = capfd.readouterr().err
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
