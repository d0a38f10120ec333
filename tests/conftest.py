"""Session-wide fixtures: tiny real checkpoints built locally (see tests/fixtures/tiny_models.py).

Set PRINMIX_TEST_CACHE=/some/dir to keep the built checkpoints across test sessions.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
# Tests never download: a name that is not a directory resolves through the local Hub cache only.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Triton reads TRITON_INTERPRET when it is first imported, and other libraries import it early (peft
# does, at collection of tests/export/): without a GPU, its kernels run in the interpreter (test_triton_kernels).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from prinmix.tiny_models import TinyModelFactory  # noqa: E402


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> TinyModelFactory:
    """The TinyModelFactory of this session (cached in PRINMIX_TEST_CACHE when set)."""
    cache = os.environ.get("PRINMIX_TEST_CACHE")
    root = Path(cache) if cache else tmp_path_factory.mktemp("tiny_models")
    return TinyModelFactory(root)


@pytest.fixture(scope="session")
def tiny_pair(tiny_models):
    """Factory: tiny_pair(family, dtype="float32") -> (base_dir, ft_dir) for family in llama/qwen2/mistral."""
    return tiny_models.pair


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_models):
    """The PreTrainedTokenizerFast shared by all tiny models."""
    return tiny_models.tokenizer
