"""Models by Hub id: resolved through a local Hugging Face cache built from the tiny models (no network)."""

from __future__ import annotations

import shutil

import pytest
from safetensors.torch import load_file

from prinmix import api
from prinmix.checkpoint.hub import resolve_model_dir
from prinmix.cli import main
from prinmix.errors import CheckpointError

BASE_COMMIT = "1" * 40
FT_COMMIT = "2" * 40


def _cache_repo(cache, repo_id: str, src, commit: str, ref: str = "main") -> None:
    """Lay `src` out as huggingface_hub's cache does: models--org--name/{refs/<ref>, snapshots/<commit>/…}."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    shutil.copytree(src, repo / "snapshots" / commit, dirs_exist_ok=True)


@pytest.fixture
def hub_cache(tiny_pair, tmp_path, monkeypatch):
    base, ft = tiny_pair("llama")
    cache = tmp_path / "hub"
    _cache_repo(cache, "tiny/llama-base", base, BASE_COMMIT)
    _cache_repo(cache, "tiny/llama-base", base, BASE_COMMIT, ref="v1")
    _cache_repo(cache, "tiny/llama-ft", ft, FT_COMMIT)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return base, ft, cache


def test_resolve_hub_id_local_dir_and_cache_path(hub_cache):
    base, _, cache = hub_cache
    src = resolve_model_dir("tiny/llama-base")
    assert src.path == cache / "models--tiny--llama-base" / "snapshots" / BASE_COMMIT
    assert (src.repo_id, src.revision, src.commit) == ("tiny/llama-base", None, BASE_COMMIT)
    assert resolve_model_dir("tiny/llama-base", revision="v1").record() == \
        {"source": "tiny/llama-base", "revision": "v1", "commit": BASE_COMMIT}
    local = resolve_model_dir(base)
    assert local.path == base and local.record() == {"source": str(base)}
    # a snapshot directory given by path is recognised as that repo and commit
    assert resolve_model_dir(src.path).record() == {"source": "tiny/llama-base", "commit": BASE_COMMIT}


def test_offline_and_not_cached_is_one_clear_line(hub_cache):
    with pytest.raises(CheckpointError) as e:
        resolve_model_dir("tiny/not-cached")
    msg = str(e.value)
    assert "tiny/not-cached" in msg and "HF_HUB_OFFLINE" in msg and str(hub_cache[2]) in msg and "\n" not in msg
    with pytest.raises(CheckpointError, match="revision v9"):
        resolve_model_dir("tiny/llama-base", revision="v9")
    with pytest.raises(CheckpointError, match="local directory has no revision"):
        resolve_model_dir(hub_cache[0], revision="main")
    with pytest.raises(CheckpointError, match="no such directory"):
        resolve_model_dir("./missing/dir")


def test_compress_merge_info_by_hub_id(hub_cache, tmp_path, capsys):
    base, ft, _ = hub_cache
    by_id = tmp_path / "id.delta"
    by_dir = tmp_path / "dir.delta"
    api.compress("tiny/llama-base", "tiny/llama-ft", by_id, method="lowrank", device="cpu", base_revision="v1")
    api.compress(base, ft, by_dir, method="lowrank", device="cpu")
    d = api.info(by_id)
    assert d.base["source"] == "tiny/llama-base" and d.base["revision"] == "v1"
    assert d.base["commit"] == BASE_COMMIT
    assert d.base["content_hash"] == api.info(by_dir).base["content_hash"]
    assert main(["info", str(by_id)]) == 0
    assert f"tiny/llama-base @ v1 (commit {BASE_COMMIT})" in capsys.readouterr().out
    m_id = api.merge("tiny/llama-base", by_id, tmp_path / "m_id")
    m_dir = api.merge(base, by_dir, tmp_path / "m_dir")
    a, b = load_file(m_id / "model.safetensors"), load_file(m_dir / "model.safetensors")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
