"""Write a whole output directory atomically: build it in a temporary sibling, then rename it into place."""

from __future__ import annotations

import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .output_safety import apply_umask, check_output_directory

__all__ = ["atomic_directory", "check_output_directory"]


@contextmanager
def atomic_directory(output) -> Iterator[Path]:
    """Yield an empty temporary directory beside OUTPUT; when the block succeeds it becomes OUTPUT.

    The temporary directory is a sibling (same filesystem, so the final rename is atomic). An existing
    OUTPUT (callers decide whether replacing it is allowed) is first renamed aside and deleted only after
    the new directory is in place, so a failure at any point leaves either the old or the new directory.
    On an exception the temporary directory is removed and the exception propagates.
    """
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        apply_umask(tmp, directory=True)  # mkdtemp makes 0700; the output gets the mode mkdir would give
        yield tmp
        for path in tmp.rglob("*"):  # safetensors' save_file (0.8) creates 0600 files, whatever the umask
            if not path.is_symlink():
                apply_umask(path, directory=path.is_dir())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if output.exists():
        old = output.with_name(f".{output.name}.replaced-{uuid.uuid4().hex[:8]}")
        output.rename(old)
    try:
        tmp.rename(output)
    except BaseException:
        if old is not None:
            old.rename(output)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
