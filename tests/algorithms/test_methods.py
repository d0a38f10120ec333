"""The method registry: every registered method compresses, its calibrated flag and minimum ratio mean what
they say, and the CLI offers exactly the registered names."""

import pytest
import torch

from fixtures.synthetic import synthetic_delta
from prinmix.algorithms.compress_matrix import compress_matrix
from prinmix.algorithms.methods import CALIBRATED, METHOD_NAMES, METHODS, method
from prinmix.cli import build_parser


def test_every_registered_method_compresses():
    W = synthetic_delta(16, 24, seed=0)
    for name in METHOD_NAMES:
        m = compress_matrix(W, None, 1 / 8, name)
        assert m.method == name and 8 * m.nbytes() <= 1 / 8 * 16 * W.numel() + 8 * 8


def test_registry_entries():
    assert set(CALIBRATED) == {"prinmix", "deltacome"}
    assert METHODS["bitdelta"].min_ratio == 1 / 16
    assert method("lowrank").calibrated is False
    with pytest.raises(ValueError, match="choose one of prinmix"):
        method("zip")
    with pytest.raises(ValueError):
        compress_matrix(torch.randn(4, 5), None, 0.5, "zip")


def test_cli_method_choices_come_from_the_registry():
    parser = build_parser()
    compress = parser._subparsers._group_actions[0].choices["compress"]
    choices = next(a.choices for a in compress._actions if a.dest == "method")
    assert tuple(choices) == METHOD_NAMES
