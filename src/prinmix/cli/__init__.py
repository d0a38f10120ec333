"""`prinmix` command line: argument parsing, progress and printing only; the work is in prinmix.api.

One module per group of subcommands (compress.py: compress/merge/info/demo, evaluate.py: eval/report,
export.py: export-lora, serve.py: serve). Building the parser imports no torch: each command imports
what it runs inside its function (the one exception to imports-at-the-top), so `prinmix --help` is fast.
"""

from __future__ import annotations

import argparse
import os
import sys

from safetensors import SafetensorError

from ..errors import PrinmixError
from .compress import add_compress_parsers
from .evaluate import add_eval_parser, add_report_parser
from .export import add_export_lora_parser
from .serve import add_serve_parser

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="prinmix", description="PrinMix delta compression of LLM fine-tunes")
    sub = p.add_subparsers(dest="command", required=True)
    add_compress_parsers(sub)
    add_eval_parser(sub)
    add_report_parser(sub)
    add_export_lora_parser(sub)
    add_serve_parser(sub)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
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

