"""Who may register a tenant at run time, from where, and under which name (POST /v1/load_lora_adapter).

Off unless the server was started with it (ServerConfig.allow_runtime_loading). When on, a delta path
is followed through every symlink and must then be a regular file inside one of the directories given
at start; a relative path is looked up in those directories in order. Every refusal of a path reads
the same whether the path is outside the directories, missing, a directory or unreadable, so the
endpoint cannot be used to probe the machine's file system.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import PrinmixError

__all__ = ["TENANT_NAME", "DeltaDirectories", "check_tenant_name"]

# letters, digits and . _ - : / (HF-style "org/name" ids), starting with a letter or digit, ≤ 128 characters
TENANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}")


def check_tenant_name(name: str) -> None:
    """PrinmixError unless `name` is a tenant name the server accepts (TENANT_NAME)."""
    if not TENANT_NAME.fullmatch(name):
        raise PrinmixError(f"invalid tenant name {name[:64]!r}: use up to 128 letters, digits and . _ - : / "
                           f"starting with a letter or digit")


class DeltaDirectories:
    """The directories runtime loads may read from (resolved once, at start)."""

    def __init__(self, dirs: list[str]):
        self.roots = [Path(os.path.realpath(d)) for d in dirs]

    def resolve(self, given: str) -> Path:
        """The real path of the delta file `given` names, or PrinmixError (the same message for every reason)."""
        candidates = [Path(given)] if os.path.isabs(given) else [root / given for root in self.roots]
        for candidate in candidates:
            try:
                real = Path(os.path.realpath(candidate))
            except (ValueError, OSError):    # NUL bytes, symlink loops: treated as not there
                continue
            if any(real.is_relative_to(root) for root in self.roots) and real.is_file():
                return real
        raise PrinmixError(f"no delta file {given[:256]!r} in the directories this server loads deltas from")
