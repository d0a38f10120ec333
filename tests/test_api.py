"""The public surface: every operation exported with Args/Returns docstrings; loaded models refused clearly."""

from __future__ import annotations

import pytest
import torch

import prinmix
from prinmix.errors import PrinmixError

OPERATIONS = ["compress", "merge", "info", "load_delta", "export_lora", "evaluate_deltas", "report", "apply_delta",
              "load_with_deltas"]


@pytest.mark.parametrize("name", OPERATIONS)
def test_operation_is_exported_and_documented(name):
    fn = getattr(prinmix, name)
    assert callable(fn) and name in prinmix.__all__
    assert "Args:" in fn.__doc__ and "Returns:" in fn.__doc__


def test_a_loaded_model_where_a_checkpoint_is_expected_is_refused_with_what_to_do(tmp_path):
    model = torch.nn.Linear(2, 2)
    for call in (lambda: prinmix.compress(model, model, tmp_path / "x.delta"),
                 lambda: prinmix.merge(model, tmp_path / "x.delta", tmp_path / "out"),
                 lambda: prinmix.evaluate_deltas(model, [tmp_path / "x.delta"]),
                 lambda: prinmix.export_lora(model, tmp_path / "x.delta", tmp_path / "a")):
        with pytest.raises(PrinmixError, match="save_pretrained.*apply_delta"):
            call()
