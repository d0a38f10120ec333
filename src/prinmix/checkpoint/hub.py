"""A model given by name: a local directory or a Hugging Face Hub id, resolved to a local snapshot directory.

    resolve_model_dir("HuggingFaceTB/SmolLM2-135M", revision="main") -> ModelSource(path=…/snapshots/<commit>, …)
    resolve_model_dir("./my-finetune")                              -> ModelSource(path=Path("my-finetune"), …)

An existing directory always wins (as in transformers' `from_pretrained`). Anything else that is a
valid repo id is fetched through `huggingface_hub.snapshot_download` into the standard Hub cache
(HF_HOME / HF_HUB_CACHE), so a model downloaded once by transformers, vLLM or `hf download` is reused
and nothing is downloaded twice. Only the files prinmix reads are fetched: safetensors weights and the
small config/tokenizer files (no .bin/.pth/.gguf duplicates of the weights).

Offline (HF_HUB_OFFLINE=1, read when called so that a script may set it late): `local_files_only=True`,
and a model that is not in the cache is one line naming the id, the revision and the cache directory.
A directory inside the Hub cache (…/models--org--name/snapshots/<commit>) is recognised, so its repo id
and commit are recorded even when the user passes the path.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import (
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

from ..errors import CheckpointError

__all__ = ["ModelSource", "resolve_model_dir", "hub_offline", "HUB_FILE_PATTERNS"]

# What prinmix reads from a model repository: weights as safetensors (CheckpointReader, a LoRA
# adapter's adapter_model.safetensors) and the small files merge carries (config, tokenizer, template).
HUB_FILE_PATTERNS = ["*.safetensors", "*.json", "*.model", "*.txt", "*.jinja", "*.tiktoken"]

_CACHE_SNAPSHOT = re.compile(r"models--(?P<repo>[^/]+)/snapshots/(?P<commit>[0-9a-f]{40})/?$")


@dataclass(frozen=True)
class ModelSource:
    """Where a model came from: what the user gave, the local directory, and the Hub revision/commit if any.

    given: the name or path as given; path: the local directory read; repo_id: the Hub id (None for a
    plain local directory); revision: the requested branch/tag/commit (None = the default branch);
    commit: the 40-hex commit of the snapshot read (None when unknown, e.g. a plain local directory).
    """
    given: str
    path: Path
    repo_id: str | None = None
    revision: str | None = None
    commit: str | None = None

    def record(self) -> dict:
        """The JSON-ready description a delta stores of its base (keys with a value only)."""
        out = {"source": self.repo_id or self.given, "revision": self.revision, "commit": self.commit}
        return {k: v for k, v in out.items() if v}


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as set now (huggingface_hub reads it once at import), or huggingface_hub's own flag."""
    return constants.is_offline_mode() or os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES",
                                                                                                    "TRUE")


def _looks_like_repo_id(name: str) -> bool:
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _from_cache_path(given: str, path: Path) -> ModelSource:
    m = _CACHE_SNAPSHOT.search(path.resolve().as_posix())
    if m:
        return ModelSource(given, path, m.group("repo").replace("--", "/", 1), None, m.group("commit"))
    return ModelSource(given, path)


def resolve_model_dir(name_or_path: str | os.PathLike, revision: str | None = None) -> ModelSource:
    """A local directory, or a Hub id fetched into (or found in) the Hub cache; CheckpointError when neither.

    Args:
        name_or_path: a directory, or a Hub repo id such as "HuggingFaceTB/SmolLM2-135M".
        revision: a branch, tag or commit of the Hub repo (None: its default branch). Refused for a
            local directory, whose content has no revision.

    Returns:
        ModelSource with the local directory to read and what to record about it.
    """
    given = os.fspath(name_or_path)
    path = Path(given).expanduser()
    if path.exists():
        if revision:
            raise CheckpointError(f"{given}: a local directory has no revision (--revision {revision} is for a "
                                  "Hugging Face Hub id)")
        return _from_cache_path(given, path)
    if not _looks_like_repo_id(given):
        raise CheckpointError(f"{given}: no such directory (and not a Hugging Face Hub id such as org/name)")
    offline = hub_offline()
    at = f" at revision {revision}" if revision else ""
    try:
        snapshot = snapshot_download(given, revision=revision, allow_patterns=HUB_FILE_PATTERNS,
                                     local_files_only=offline, cache_dir=os.environ.get("HF_HUB_CACHE") or None)
    except LocalEntryNotFoundError:
        cache = os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE
        why = "HF_HUB_OFFLINE is set" if offline else "the Hub cannot be reached"
        raise CheckpointError(f"{given}: not in the Hugging Face cache ({cache}){at} and {why}; download it once "
                              f"with network access (hf download {given}) or give a local directory") from None
    except RevisionNotFoundError:
        raise CheckpointError(f"{given}: the Hub repository has no revision {revision!r}") from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"{given}: no such directory, and no such Hugging Face Hub repository (or it is "
                              "gated/private: log in with `hf auth login`)") from None
    except (OSError, ValueError) as e:  # network and HTTP errors of huggingface_hub derive from OSError
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{given}: cannot fetch from the Hugging Face Hub{at} ({first})") from None
    path = Path(snapshot)
    commit = path.name if re.fullmatch(r"[0-9a-f]{40}", path.name) else None
    return ModelSource(given, path, given, revision, commit)
