"""Where a command may write: never onto or into its inputs, never over something it did not make.

Every command that writes (compress, merge, export-lora, eval, report) calls `refuse_input_overlap`
before any work, with its inputs (checkpoint directories, delta files, result files) and its outputs:
an output equal to an input, inside an input directory, or a directory holding an input is refused
with one line. Paths are compared resolved (symlinks followed), so `-o base/../base` or a link to the
base is caught too.

Output directories (a merged checkpoint, a LoRA adapter, a report) carry a marker file MARKER
recording their kind. `check_output_directory(..., kind)` lets --force replace only a directory
marked with the same kind; a non-empty directory without it (a user's model, a home directory) is
refused, naming what it holds. A dot-file is ignored by Hugging Face, vLLM and PEFT loaders.

Permissions: tempfile's mkstemp/mkdtemp create 0600/0700 (private temporaries); an atomic writer
that renames such a temporary into place would leave the output unreadable to the group and others
whatever the umask says. `apply_umask` gives it the mode an ordinary open()/mkdir() would have.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import PrinmixError

MARKER = ".prinmix-output"
MERGED_CHECKPOINT = "merged-checkpoint"
LORA_ADAPTER = "lora-adapter"
REPORT = "report"


def _resolved(path) -> Path:
    return Path(path).expanduser().resolve()


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def refuse_input_overlap(outputs, inputs, command: str) -> None:
    """Raise PrinmixError when an output path would overwrite, or be written inside, or replace a
    directory holding, one of the inputs. outputs/inputs: paths (files or directories; None skipped)."""
    outs = [(o, _resolved(o)) for o in outputs if o is not None]
    for src in (i for i in inputs if i is not None):
        src_r = _resolved(src)
        for out, out_r in outs:
            if out_r == src_r:
                raise PrinmixError(f"{out}: is an input of this {command} ({src}); writing there would destroy it")
            if src_r.is_dir() and _inside(out_r, src_r):
                raise PrinmixError(f"{out}: is inside the input {src} of this {command}; choose an output elsewhere")
            if _inside(src_r, out_r):
                raise PrinmixError(f"{out}: holds the input {src} of this {command}; replacing it would delete "
                                   f"the input; choose another output")


def _marker_kind(directory: Path) -> str | None:
    try:
        return json.loads((directory / MARKER).read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        return None


def _contents(directory: Path, limit: int = 4) -> str:
    names = sorted(p.name for p in directory.iterdir())
    return ", ".join(names[:limit]) + (f", … ({len(names)} entries)" if len(names) > limit else "")


def check_output_directory(output, overwrite: bool, kind: str | None = None) -> None:
    """Refuse an OUTPUT that is a file; a non-empty directory unless overwrite; and, with overwrite, a
    non-empty directory that is not a previous output of the same `kind` (its marker), naming what it holds."""
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise PrinmixError(f"{output}: exists and is not a directory")
    if not output.is_dir() or not any(output.iterdir()):
        return
    if not overwrite:
        raise PrinmixError(f"{output}: exists and is not empty (pass overwrite / --force to replace it)")
    if kind is not None and _marker_kind(output) != kind:
        raise PrinmixError(f"{output}: holds other files than an earlier prinmix {kind} ({_contents(output)}); "
                           f"prinmix replaces only its own outputs: remove them yourself or choose another output")


def write_marker(directory, kind: str) -> None:
    """Mark DIRECTORY as a prinmix output of `kind` (see check_output_directory)."""
    path = Path(directory) / MARKER
    path.write_text(json.dumps({"kind": kind}) + "\n")


def current_umask() -> int:
    """The process umask (read by setting and restoring it: there is no read-only call)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path, directory: bool = False) -> None:
    """Give PATH (a temporary from mkstemp/mkdtemp) the mode open()/mkdir() would: 0666/0777 & ~umask."""
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())
