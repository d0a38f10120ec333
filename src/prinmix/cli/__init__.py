"""`prinmix` command line: argument parsing, progress and printing only; the work is in prinmix.api.

One module per group of subcommands (compress.py: compress/merge/info/demo, evaluate.py: eval/report,
export.py: export-lora, serve.py: serve). Building the parser imports no torch: each command imports
what it runs inside its function (the one exception to imports-at-the-top), so `prinmix --help` is fast.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from safetensors import SafetensorError

from .. import __version__
from ..errors import PrinmixError
from .compress import add_compress_parsers
from .evaluate import add_eval_parser, add_report_parser
from .export import add_export_lora_parser
from .serve import add_serve_parser

__all__ = ["build_parser", "main"]


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """argparse's ArgumentDefaultsHelpFormatter, minus the noise: "(default: X)" after every option whose
    default is a value; none for flags (False) and for None, whose help says what happens instead."""

    def _get_help_string(self, action) -> str:
        text = action.help or ""
        if "%(default)" in text or action.default in (None, False, argparse.SUPPRESS) or action.default == []:
            return text
        if not action.option_strings and action.nargs not in ("?", "*"):
            return text
        return f"{text} (default: %(default)s)".strip()


class _Parser(argparse.ArgumentParser):
    """Every (sub)command parser shows its defaults."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="prinmix", description="PrinMix delta compression of LLM fine-tunes")
    p.add_argument("--version", action="version", version=f"prinmix {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    add_compress_parsers(sub)
    add_eval_parser(sub)
    add_report_parser(sub)
    add_export_lora_parser(sub)
    add_serve_parser(sub)
    return p


# Commands that only read delta metadata: they must not pay for importing transformers (or torch).
METADATA_COMMANDS = ("info",)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """prinmix's own warnings as one line ("prinmix: warning: …"); other libraries' in Python's format."""
    if "prinmix" in str(filename):
        print(f"prinmix: warning: {message}", file=sys.stderr)
    else:
        print(warnings.formatwarning(message, category, filename, lineno, line), end="", file=sys.stderr)


def quiet_model_loading() -> None:
    """No library chatter around loading models: transformers logs errors only (no "Token indices
    sequence length …" warnings) and shows no per-model "Loading weights" bars; prinmix's own bars
    say what they count. TRANSFORMERS_VERBOSITY set by the user wins."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers.utils import logging as hf_logging  # the CLI's lazy import: not needed by `info`

    if os.environ["TRANSFORMERS_VERBOSITY"] == "error":
        hf_logging.set_verbosity_error()  # transformers may have been imported before the variable was set
    hf_logging.disable_progress_bar()


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    warnings.showwarning = _show_warning
    if args.command not in METADATA_COMMANDS:
        quiet_model_loading()
    try:
        return args.fn(args)
    except PrinmixError as e:
        print(f"prinmix: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prinmix: interrupted (rerun the same command to resume)", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `prinmix info x.delta | head`: the reader left; stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except (OSError, SafetensorError) as e:  # read-only output, disk full, --offload on a read-only path…
        print(f"prinmix: error: {_io_error_line(e)}", file=sys.stderr)
        return 2


def _io_error_line(e: Exception) -> str:
    """One line for an I/O failure: the file (the destination of a rename) and the system's reason.
    safetensors reports write errors as SafetensorError('Error while serializing: IoError(Os {…})')."""
    if isinstance(e, OSError):
        where = e.filename2 or e.filename
        return f"{where}: {e.strerror or e}" if where else f"{e.strerror or e}"
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return f"cannot write a safetensors file: {text}"

