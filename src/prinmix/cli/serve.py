"""`prinmix serve`: parse the tenants, load everything, run uvicorn.

fastapi/uvicorn are optional (the `serve` extra): imported inside cmd_serve only."""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import PrinmixError


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


def cmd_serve(a) -> int:
    try:
        import uvicorn

        from ..serve.app import load_app
    except ImportError as e:
        raise PrinmixError(f"prinmix serve needs fastapi and uvicorn ({e}); pip install 'prinmix[serve]'") from None

    app = load_app(a.base, tenant_map(a.deltas, a.name), device=a.device, max_batch=a.max_batch,
                   max_model_len=a.max_model_len, base_name=a.base_name,
                   log=lambda line: print(line, file=sys.stderr, flush=True))
    uvicorn.run(app, host=a.host, port=a.port, log_level=a.log_level)
    return 0


def add_serve_parser(sub) -> None:
    """The `prinmix serve` subcommand, on the CLI's subparsers object."""
    p = sub.add_parser("serve", help="serve BASE and delta tenants over an OpenAI-compatible HTTP API")
    p.add_argument("base", help="the base model's checkpoint directory")
    p.add_argument("deltas", nargs="*", metavar="DELTA", help="delta file; its tenant is named after the file's stem")
    p.add_argument("--name", action="append", default=[], metavar="NAME=DELTA", help="a tenant with a chosen name")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--max-batch", type=int, default=32, help="most sequences decoded together in one step")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="most tokens of prompt + completion (default: the model's max_position_embeddings)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--base-name", default=None, help="the base's model name (default: its directory's name)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level")
    p.set_defaults(fn=cmd_serve)
