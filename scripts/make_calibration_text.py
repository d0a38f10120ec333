"""Regenerate src/prinmix/data/calibration.txt: the built-in calibration text.

The text is the docstrings of a fixed list of Python standard-library modules (module, public
classes, their public methods, public functions), read from the running interpreter, deduplicated
and cut at TARGET_BYTES. Docstrings are Python Software Foundation material under the PSF License
Agreement, which allows redistribution with the copyright notice written in the file's header.
No network access. Usage: python scripts/make_calibration_text.py [output path]
"""

from __future__ import annotations

import importlib
import inspect
import sys
import warnings
from pathlib import Path

TARGET_BYTES = 600_000
DEFAULT_OUTPUT = Path(__file__).resolve().parents[1] / "src" / "prinmix" / "data" / "calibration.txt"
MODULES = (
    "abc argparse ast asyncio.events asyncio.tasks base64 bisect calendar cmd codecs collections "
    "concurrent.futures configparser contextlib copy csv dataclasses datetime decimal difflib doctest "
    "email.message enum fileinput fnmatch fractions ftplib functools getopt gettext glob gzip hashlib "
    "heapq hmac html.parser http.client http.cookies http.server imaplib inspect io ipaddress "
    "itertools json logging logging.handlers mailbox mimetypes numbers operator optparse os pathlib "
    "pickle pkgutil platform plistlib poplib pprint profile queue quopri random re reprlib sched "
    "secrets selectors shelve shlex shutil smtplib socket socketserver sqlite3 statistics string "
    "struct subprocess symtable tarfile tempfile textwrap threading timeit tokenize trace traceback "
    "typing unittest.case unittest.mock urllib.parse urllib.request uuid warnings wave weakref "
    "xml.dom.minidom xml.etree.ElementTree zipfile zipimport"
).split()


def header() -> str:
    version = ".".join(str(v) for v in sys.version_info[:2])
    return (
        f"# prinmix built-in calibration text: docstrings of the Python {version} standard library.\n"
        "# Copyright (c) 2001-2024 Python Software Foundation; All Rights Reserved. "
        "Licensed under the PSF License Agreement (https://docs.python.org/3/license.html).\n\n"
    )


def public_docstrings(module) -> list[tuple[str, str]]:
    """(qualified name, cleaned docstring) of the module, its public classes/methods and functions."""
    found = [(module.__name__, inspect.getdoc(module) or "")]
    for name, member in sorted(vars(module).items()):
        if name.startswith("_") or getattr(member, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(member):
            found.append((f"{module.__name__}.{name}", inspect.getdoc(member) or ""))
            for method_name, method in sorted(vars(member).items()):
                if not method_name.startswith("_") and inspect.isfunction(method):
                    found.append((f"{module.__name__}.{name}.{method_name}", inspect.getdoc(method) or ""))
        elif inspect.isfunction(member):
            found.append((f"{module.__name__}.{name}", inspect.getdoc(member) or ""))
    return [(n, d.strip()) for n, d in found if len(d.strip()) >= 40]


def build_text() -> str:
    parts, seen, size = [header()], set(), 0
    for module_name in MODULES:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module = importlib.import_module(module_name)
        except ImportError:
            continue
        for name, doc in public_docstrings(module):
            if doc in seen:
                continue
            seen.add(doc)
            block = f"{name}\n\n{doc}\n\n"
            if size + len(block.encode("utf-8")) > TARGET_BYTES:
                return "".join(parts)
            parts.append(block)
            size += len(block.encode("utf-8"))
    return "".join(parts)


def main() -> None:
    output = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUTPUT
    output.parent.mkdir(parents=True, exist_ok=True)
    text = build_text()
    output.write_text(text, encoding="utf-8")
    print(f"wrote {output} ({len(text.encode('utf-8'))} bytes)")


if __name__ == "__main__":
    main()
