"""The server's settings (one dataclass, checked once at start) and the environment variables it reads.

Environment variables, as vLLM's OpenAI server reads them (a flag wins over its variable):
    VLLM_API_KEY / PRINMIX_API_KEY                        the API key (--api-key)
    VLLM_ALLOW_RUNTIME_LORA_UPDATING / PRINMIX_ALLOW_RUNTIME_LOADING
                                                          "true"/"1": runtime loading on (--allow-runtime-loading)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import PrinmixError

__all__ = ["API_KEY_ENV", "RUNTIME_LOADING_ENV", "SERVE_DTYPES", "ServerConfig", "env_api_key", "env_runtime_loading"]

API_KEY_ENV = ("VLLM_API_KEY", "PRINMIX_API_KEY")
RUNTIME_LOADING_ENV = ("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "PRINMIX_ALLOW_RUNTIME_LOADING")
SERVE_DTYPES = ("auto", "float32", "bfloat16", "float16")  # vLLM's --dtype names; auto = the checkpoint's
DEFAULT_MAX_BODY_BYTES = 4 * 2**20          # a 4 MiB request holds far more than any max-model-len prompt's text


def env_api_key() -> str | None:
    return next((os.environ[v] for v in API_KEY_ENV if os.environ.get(v)), None)


def env_runtime_loading() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on") for v in RUNTIME_LOADING_ENV)


@dataclass
class ServerConfig:
    """Settings of `prinmix serve` beyond the base and its tenants.

    max_batch: most sequences decoded in one step; max_model_len: most tokens of prompt + completion
    (None = the model's max_position_embeddings); api_key: required as `Authorization: Bearer KEY` on
    every endpoint but /health (None = no authentication); max_body_bytes: larger request bodies are
    answered 413 while being read; allow_runtime_loading: /v1/load_lora_adapter and
    /v1/unload_lora_adapter work (else 403); runtime_delta_dirs: the only directories a runtime load may
    read a delta from (symlinks resolved); max_tenants: most tenants registered at once (start-up and
    runtime loads together); chat_template: a Jinja chat template overriding every model's own;
    base_name: the base's model name (None = its directory's name); dtype: the base's weights and the
    compute dtype, one of SERVE_DTYPES ("auto" = the checkpoint's, as vLLM's --dtype).
    """

    max_batch: int = 32
    max_model_len: int | None = None
    api_key: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    allow_runtime_loading: bool = False
    runtime_delta_dirs: list[str] = field(default_factory=list)
    max_tenants: int = 64
    chat_template: str | None = None
    base_name: str | None = None
    dtype: str = "auto"

    def check(self) -> None:
        """One-line PrinmixError for a setting that cannot work."""
        for name, flag in (("max_batch", "--max-num-seqs"), ("max_tenants", "--max-tenants"),
                           ("max_body_bytes", "--max-body-bytes")):
            if getattr(self, name) < 1:
                raise PrinmixError(f"{flag} must be >= 1, got {getattr(self, name)}")
        if self.dtype not in SERVE_DTYPES:
            raise PrinmixError(f"--dtype {self.dtype!r}: use one of {', '.join(SERVE_DTYPES)}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise PrinmixError(f"--max-model-len must be >= 1, got {self.max_model_len}")
        if self.api_key is not None and not self.api_key.strip():
            raise PrinmixError("--api-key is empty")
        if self.allow_runtime_loading and not self.runtime_delta_dirs:
            raise PrinmixError("runtime loading needs at least one --runtime-delta-dir DIR to load deltas from")
        for d in self.runtime_delta_dirs:
            if not Path(d).is_dir():
                raise PrinmixError(f"--runtime-delta-dir {d}: not a directory")
