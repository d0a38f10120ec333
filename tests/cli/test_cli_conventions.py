"""CLI conventions: --version, every default in --help, help for positionals, --json/--quiet, info --json settings."""

from __future__ import annotations

import argparse
import json

import pytest

import prinmix
from prinmix.cli import build_parser, main

FAST = ["--nsamples", "2", "--seqlen", "32", "--device", "cpu"]


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"prinmix {prinmix.__version__}"


@pytest.mark.parametrize("command", sorted(_subcommands()))
def test_help_shows_every_default_and_explains_positionals(command):
    parser = _subcommands()[command]
    text = " ".join(parser.format_help().split())
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if not action.option_strings:
            assert action.help, f"{command}: positional {action.dest} has no help"
        elif action.default not in (None, False, [], argparse.SUPPRESS):
            shown = f"(default: {action.default})"
            assert shown in text, f"{command} {action.option_strings[0]}: {shown} not in --help"


def test_json_and_quiet(tiny_pair, tmp_path, capfd):
    base, ft = tiny_pair("llama")
    delta = tmp_path / "d.delta"
    assert main(["compress", str(base), str(ft), "-o", str(delta), "--quiet", "--json", *FAST]) == 0
    captured = capfd.readouterr()
    summary = json.loads(captured.out)
    assert summary["path"] == str(delta) and 0 < summary["ratio_achieved"] <= 0.0625 * 1.01
    assert "layer" not in captured.err  # no progress bar
    assert main(["eval", str(base), str(delta), "--finetuned", str(ft), "--metrics", "error", "--nsamples", "1",
                 "--seqlen", "16", "--device", "cpu", "--quiet", "--json"]) == 0
    captured = capfd.readouterr()
    assert json.loads(captured.out)["layer_error"]["summary"]["d"]["all"]["all"] > 0 and captured.err == ""
    assert main(["info", str(delta), "--json"]) == 0
    settings = json.loads(capfd.readouterr().out)["settings"]
    assert settings == {"method": "prinmix", "ratio": 0.0625, "calib": "builtin", "nsamples": 2, "seqlen": 32,
                        "seed": 0, "widths": [0, 2, 3, 4, 5, 6, 7, 8], "fmax": 4, "distill_steps": 0,
                        "prinmix_version": prinmix.__version__}
