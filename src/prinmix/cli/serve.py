"""`prinmix serve`: parse the tenants, load everything, run uvicorn.

fastapi/uvicorn are optional (the `serve` extra): imported inside cmd_serve only."""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import PrinmixError
from ..serve.config import (
    API_KEY_ENV,
    RUNTIME_LOADING_ENV,
    SERVE_DTYPES,
    ServerConfig,
    env_api_key,
    env_runtime_loading,
)


def tenant_map(deltas: list[str], named: list[str]) -> dict[str, str]:
    """{tenant name: delta path}: positional deltas are named after their file's stem, NAME=DELTA as given."""
    tenants: dict[str, str] = {}
    pairs = [(Path(d).stem, d) for d in deltas]
    for item in named:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise PrinmixError(f"--name expects NAME=DELTA, got {item!r}")
        pairs.append((name, path))
    for name, path in pairs:
        if name in tenants:
            raise PrinmixError(f"two tenants are named {name!r}; name one with --name NAME=DELTA")
        if not Path(path).is_file():
            raise PrinmixError(f"no delta file at {path}")
        tenants[name] = path
    return tenants


def server_config(a) -> ServerConfig:
    """The ServerConfig of the parsed flags (environment variables filling in as vLLM's do), checked."""
    if not 1 <= a.port <= 65535:
        raise PrinmixError(f"--port must be in 1..65535, got {a.port}")
    template = None
    if a.chat_template is not None:
        try:
            template = Path(a.chat_template).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise PrinmixError(f"--chat-template {a.chat_template}: cannot read it ({e})") from None
    config = ServerConfig(max_batch=a.max_batch, max_model_len=a.max_model_len,
                          api_key=a.api_key if a.api_key is not None else env_api_key(),
                          max_body_bytes=a.max_body_bytes,
                          allow_runtime_loading=a.allow_runtime_loading or env_runtime_loading(),
                          runtime_delta_dirs=a.runtime_delta_dir, max_tenants=a.max_tenants, chat_template=template,
                          base_name=a.base_name, dtype=a.dtype)
    config.check()
    return config


def cmd_serve(a) -> int:
    config = server_config(a)
    tenants = tenant_map(a.deltas, a.name)
    try:
        import uvicorn

        from ..serve.app import load_app
    except ImportError as e:
        raise PrinmixError(f"prinmix serve needs fastapi and uvicorn ({e}); pip install 'prinmix[serve]'") from None

    app = load_app(a.base, tenants, device=a.device, config=config,
                   log=lambda line: print(line, file=sys.stderr, flush=True))
    uvicorn.run(app, host=a.host, port=a.port, log_level=a.log_level)
    return 0


def add_serve_parser(sub) -> None:
    """The `prinmix serve` subcommand, on the CLI's subparsers object. Where vLLM has a flag for the same
    setting, its name is the first one (the older prinmix name stays as an alias)."""
    p = sub.add_parser("serve", help="serve BASE and delta tenants over an OpenAI-compatible HTTP API")
    p.add_argument("base", help="the base model's checkpoint directory")
    p.add_argument("deltas", nargs="*", metavar="DELTA", help="delta file; its tenant is named after the file's stem")
    p.add_argument("--lora-modules", dest="name", nargs="+", action="extend", default=[], metavar="NAME=DELTA",
                   help="tenants with chosen names (vLLM's flag)")
    p.add_argument("--name", dest="name", action="append", metavar="NAME=DELTA", help="a tenant with a chosen name")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--max-num-seqs", "--max-batch", dest="max_batch", type=int, default=32,
                   help="most sequences decoded together in one step")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="most tokens of prompt + completion (default: the model's max_position_embeddings)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--dtype", default="auto", choices=SERVE_DTYPES,
                   help="the base's weights and the compute dtype (auto: the checkpoint's, as vLLM's --dtype)")
    p.add_argument("--served-model-name", "--base-name", dest="base_name", default=None,
                   help="the base's model name (default: its directory's name)")
    p.add_argument("--chat-template", default=None, metavar="FILE",
                   help="a Jinja chat template for every model (default: each model's own; none: chat is refused)")
    p.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on every endpoint but /health (default: "
                        f"${API_KEY_ENV[0]} or ${API_KEY_ENV[1]}; the variable keeps the key out of `ps`)")
    p.add_argument("--allow-runtime-loading", action="store_true",
                   help=f"enable /v1/load_lora_adapter and /v1/unload_lora_adapter (or "
                        f"{RUNTIME_LOADING_ENV[0]}=true); needs --runtime-delta-dir")
    p.add_argument("--runtime-delta-dir", action="append", default=[], metavar="DIR",
                   help="a directory runtime loads may read deltas from (repeatable; symlinks are resolved)")
    p.add_argument("--max-tenants", type=int, default=ServerConfig.max_tenants,
                   help="most tenants served at once, start-up and runtime loads together")
    p.add_argument("--max-body-bytes", type=int, default=ServerConfig.max_body_bytes,
                   help="larger request bodies are answered 413 (default 4 MiB)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level")
    p.set_defaults(fn=cmd_serve)
