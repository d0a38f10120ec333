"""load_calibration: built-in text, local files, dataset names; shapes, determinism and errors."""

from __future__ import annotations

import builtins
import json
import sys
from importlib import resources

import pytest
import torch

from prinmix.calibration.data import builtin_text, load_calibration, record_text
from prinmix.errors import PrinmixError


def token_stream(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def is_window_of(window: torch.Tensor, stream: list[int]) -> bool:
    needle = window.tolist()
    return any(stream[s : s + len(needle)] == needle for s in range(len(stream) - len(needle) + 1))


def test_builtin_text_file():
    data = resources.files("prinmix").joinpath("data/calibration.txt").read_bytes()
    assert 300_000 <= len(data) <= 800_000
    assert b"PSF License" in data.splitlines()[1] or b"PSF License" in data.splitlines()[0]
    text = builtin_text()
    assert not text.startswith("#") and len(text) > 250_000


def test_builtin_shape_and_determinism(tiny_tokenizer):
    ids = load_calibration(None, tiny_tokenizer, nsamples=6, seqlen=48, seed=3)
    assert ids.shape == (6, 48) and ids.dtype == torch.long
    assert int(ids.max()) < len(tiny_tokenizer) and int(ids.min()) >= 0
    assert torch.equal(ids, load_calibration("builtin", tiny_tokenizer, nsamples=6, seqlen=48, seed=3))
    assert not torch.equal(ids, load_calibration(None, tiny_tokenizer, nsamples=6, seqlen=48, seed=4))


def test_txt_file_windows_come_from_the_text(tiny_tokenizer, tmp_path):
    text = "\n".join(f"line {i}: the quick brown fox jumps over {i * 7} lazy dogs." for i in range(200))
    path = tmp_path / "calib.txt"
    path.write_text(text)
    ids = load_calibration(str(path), tiny_tokenizer, nsamples=4, seqlen=20, seed=0)
    stream = token_stream(tiny_tokenizer, text)
    assert ids.shape == (4, 20) and all(is_window_of(row, stream) for row in ids)


def test_short_text_gives_overlapping_windows(tiny_tokenizer, tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("one two three four five six seven eight nine ten eleven twelve")
    n_tokens = len(token_stream(tiny_tokenizer, path.read_text()))
    ids = load_calibration(str(path), tiny_tokenizer, nsamples=10, seqlen=n_tokens - 2, seed=0)
    assert ids.shape == (10, n_tokens - 2)  # 10 windows from a text holding barely more than one


def test_text_shorter_than_seqlen(tiny_tokenizer, tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text("too short")
    with pytest.raises(PrinmixError, match="fewer than seqlen") as info:
        load_calibration(str(path), tiny_tokenizer, nsamples=2, seqlen=64)
    assert str(path) in str(info.value)


def test_jsonl_fields(tiny_tokenizer, tmp_path):
    records = [
        {"text": "alpha beta gamma " * 5},
        {"prompt": "What is 12+35?", "answer": "47", "id": 3},
        {"messages": [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "general"}]},
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    ids = load_calibration(str(path), tiny_tokenizer, nsamples=3, seqlen=8, seed=1)
    assert ids.shape == (3, 8)
    assert record_text(records[1]) == "What is 12+35?\n47"
    assert record_text(records[2]) == "hello there\ngeneral"


def test_jsonl_bad_line(tiny_tokenizer, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{broken\n')
    with pytest.raises(PrinmixError, match=r"bad\.jsonl:2: not valid JSON"):
        load_calibration(str(path), tiny_tokenizer, nsamples=1, seqlen=2)


def test_missing_and_unsupported_files(tiny_tokenizer, tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(PrinmixError, match="no such calibration file") as info:
        load_calibration(str(missing), tiny_tokenizer, nsamples=1, seqlen=4)
    assert str(missing) in str(info.value)
    other = tmp_path / "data.csv"
    other.write_text("a,b\n")
    with pytest.raises(PrinmixError, match="unsupported calibration file type"):
        load_calibration(str(other), tiny_tokenizer, nsamples=1, seqlen=4)


def test_invalid_sizes(tiny_tokenizer):
    with pytest.raises(ValueError):
        load_calibration(None, tiny_tokenizer, nsamples=0, seqlen=8)


def block_import(monkeypatch, blocked: str) -> None:
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == blocked or name.startswith(blocked + "."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    for module in [m for m in sys.modules if m == blocked or m.startswith(blocked + ".")]:
        monkeypatch.delitem(sys.modules, module)
    monkeypatch.setattr(builtins, "__import__", fake_import)


def test_parquet_without_pyarrow(tiny_tokenizer, tmp_path, monkeypatch):
    path = tmp_path / "data.parquet"
    path.write_bytes(b"PAR1")
    block_import(monkeypatch, "pyarrow")
    with pytest.raises(PrinmixError, match="needs pyarrow") as info:
        load_calibration(str(path), tiny_tokenizer, nsamples=1, seqlen=4)
    assert str(path) in str(info.value)


def test_parquet_file(tiny_tokenizer, tmp_path):
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet as parquet

    path = tmp_path / "data.parquet"
    parquet.write_table(pyarrow.table({"text": ["some calibration text here"] * 20}), path)
    assert load_calibration(str(path), tiny_tokenizer, nsamples=2, seqlen=6).shape == (2, 6)


def test_dataset_name_without_datasets_package(tiny_tokenizer, monkeypatch):
    block_import(monkeypatch, "datasets")
    with pytest.raises(PrinmixError, match="needs the `datasets` package") as info:
        load_calibration("wikitext2", tiny_tokenizer, nsamples=1, seqlen=4)
    assert "wikitext2" in str(info.value)


class FakeDatasets:
    """Stands in for the `datasets` package: records the call, then serves records or fails."""

    def __init__(self, records=None, error=None):
        self.records, self.error, self.calls = records, error, []

    def load_dataset(self, path, name=None, **kwargs):
        self.calls.append((path, name, kwargs))
        if self.error is not None:
            raise self.error
        return iter(self.records)


def test_dataset_name_offline(tiny_tokenizer, monkeypatch):
    fake = FakeDatasets(error=ConnectionError("Couldn't reach the Hugging Face Hub\nmore detail"))
    monkeypatch.setitem(sys.modules, "datasets", fake)
    with pytest.raises(PrinmixError, match="cannot load Hugging Face dataset 'org/name'.*Couldn't reach"):
        load_calibration("org/name", tiny_tokenizer, nsamples=1, seqlen=4)


def test_dataset_aliases(tiny_tokenizer, monkeypatch):
    fake = FakeDatasets(records=[{"text": "wiki text " * 50}, {"text": ""}])
    monkeypatch.setitem(sys.modules, "datasets", fake)
    assert load_calibration("wikitext2", tiny_tokenizer, nsamples=2, seqlen=8).shape == (2, 8)
    assert fake.calls[0][:2] == ("wikitext", "wikitext-2-raw-v1")
    load_calibration("org/name:subset", tiny_tokenizer, nsamples=1, seqlen=8)
    assert fake.calls[1][:2] == ("org/name", "subset") and fake.calls[1][2]["split"] == "train"
