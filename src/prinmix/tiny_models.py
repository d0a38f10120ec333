"""Tiny, real Hugging Face checkpoints for the demo and the tests, built locally in seconds (no downloads).

A byte-level BPE tokenizer (vocab 512) is trained on the built-in calibration text plus arithmetic
lines. For each family (llama: GQA, untied lm_head; qwen2: q/k/v biases, tied embeddings,
per-layer sliding-window attention; mistral: sliding-window attention, explicit head_dim) a base
is randomly initialised and pretrained a few Adam steps on calibration text, and the fine-tune is
the base trained further on "12+35=47" lines, so that the delta has real structure. Both are saved
with save_pretrained (safetensors) in float32 and bfloat16, each with the tokenizer files.

Layout under the cache root: <root>/<VERSION>/tokenizer and <root>/<VERSION>/<family>/<dtype>/{base,finetuned}.
"""

from __future__ import annotations

import copy
import os
import random
import shutil
import tempfile
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, PreTrainedTokenizerFast, Qwen2Config

from prinmix.calibration.data import builtin_text

VERSION = "v1"
FAMILIES = ("llama", "qwen2", "mistral")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
VOCAB_SIZE = 512
SEQ_LEN = 32
PRETRAIN_STEPS = 20
FINETUNE_STEPS = 40
FINETUNE_LR = 1e-3
BATCH = 16
SPECIAL_TOKENS = ["<s>", "</s>", "<pad>"]


def canonical_dtype(dtype: str) -> str:
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)}")
    return "float32" if DTYPES[dtype] == torch.float32 else "bfloat16"


def arithmetic_lines(count: int, seed: int) -> list[str]:
    """Lines like '12+35=47' with operands in [0, 99]."""
    rng = random.Random(seed)
    lines = []
    for _ in range(count):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        lines.append(f"{a}+{b}={a + b}")
    return lines


def train_tokenizer(directory: Path):
    """Train and save (to `directory`) a byte-level BPE PreTrainedTokenizerFast with VOCAB_SIZE entries."""
    corpus = builtin_text()[:200_000].splitlines() + arithmetic_lines(2000, seed=1)
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", model_max_length=256
    )
    tokenizer.save_pretrained(directory)
    return tokenizer


def family_config(family: str, tokenizer):
    """A tiny transformers config for `family` sized to the tokenizer."""
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if family == "llama":
        return LlamaConfig(num_hidden_layers=2, tie_word_embeddings=False, **common)
    if family == "qwen2":
        return Qwen2Config(
            num_hidden_layers=3, tie_word_embeddings=True, use_sliding_window=True, sliding_window=16,
            max_window_layers=1, **common,
        )
    if family == "mistral":
        return MistralConfig(num_hidden_layers=2, tie_word_embeddings=False, sliding_window=24, head_dim=16, **common)
    raise ValueError(f"unknown family {family!r}; use one of {FAMILIES}")


def token_windows(ids: list[int], count: int, seed: int) -> torch.Tensor:
    """[count, SEQ_LEN] random windows of the token stream `ids`."""
    generator = torch.Generator().manual_seed(seed)
    stream = torch.tensor(ids, dtype=torch.long)
    starts = torch.randint(0, len(ids) - SEQ_LEN, (count,), generator=generator)
    return torch.stack([stream[s : s + SEQ_LEN] for s in starts.tolist()])


def train_steps(model, windows: torch.Tensor, steps: int, lr: float, seed: int) -> None:
    """`steps` Adam steps of next-token loss on mini-batches of `windows`."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        batch = windows[torch.randint(0, windows.shape[0], (BATCH,), generator=generator)]
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


class single_thread:
    """Run torch on one thread inside the block (tiny models: threads only add overhead and contention)."""

    def __enter__(self) -> None:
        self.previous = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc_info) -> None:
        torch.set_num_threads(self.previous)


def build_family(family: str, tokenizer, tokenizer_dir: Path, out_dir: Path) -> None:
    """Train the base and fine-tune of `family` and save them under out_dir/<dtype>/{base,finetuned}."""
    with single_thread():
        _build_family(family, tokenizer, tokenizer_dir, out_dir)


def _build_family(family: str, tokenizer, tokenizer_dir: Path, out_dir: Path) -> None:
    seed = FAMILIES.index(family) + 10
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(family_config(family, tokenizer), dtype=torch.float32)
    text_ids = tokenizer(builtin_text()[:100_000], add_special_tokens=False, verbose=False)["input_ids"]
    train_steps(model, token_windows(text_ids, 512, seed), PRETRAIN_STEPS, lr=3e-3, seed=seed)
    save_variants(model, tokenizer_dir, out_dir, "base")
    task_ids = tokenizer("\n".join(arithmetic_lines(3000, seed)), add_special_tokens=False, verbose=False)["input_ids"]
    train_steps(model, token_windows(task_ids, 512, seed + 1), FINETUNE_STEPS, lr=FINETUNE_LR, seed=seed + 1)
    save_variants(model, tokenizer_dir, out_dir, "finetuned")


def save_variants(model, tokenizer_dir: Path, out_dir: Path, role: str) -> None:
    for dtype_name in ("float32", "bfloat16"):
        target = out_dir / dtype_name / role
        copy.deepcopy(model).to(DTYPES[dtype_name]).save_pretrained(target)
        for item in tokenizer_dir.iterdir():
            shutil.copy2(item, target / item.name)


class TinyModelFactory:
    """Builds tiny checkpoint pairs on first request and caches them under `root`."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root) / VERSION
        self.root.mkdir(parents=True, exist_ok=True)
        self._tokenizer = None

    @property
    def tokenizer_dir(self) -> Path:
        directory = self.root / "tokenizer"
        if not (directory / "tokenizer.json").exists():
            self._atomic_build(directory, lambda tmp: train_tokenizer(tmp))
        return directory

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = PreTrainedTokenizerFast.from_pretrained(str(self.tokenizer_dir))
        return self._tokenizer

    def pair(self, family: str, dtype: str = "float32") -> tuple[Path, Path]:
        """(base_dir, ft_dir) of `family` saved in `dtype` ("float32"/"fp32" or "bfloat16"/"bf16")."""
        if family not in FAMILIES:
            raise ValueError(f"unknown family {family!r}; use one of {FAMILIES}")
        dtype_name = canonical_dtype(dtype)
        family_dir = self.root / family
        if not (family_dir / "complete").exists():
            self._atomic_build(family_dir, self._build_family_into(family))
        return family_dir / dtype_name / "base", family_dir / dtype_name / "finetuned"

    def _build_family_into(self, family: str):
        def build(tmp: Path) -> None:
            build_family(family, self.tokenizer, self.tokenizer_dir, tmp)
            (tmp / "complete").write_text("ok\n")

        return build

    @staticmethod
    def _atomic_build(target: Path, build) -> None:
        """Build into a temporary sibling directory, then rename it to `target` (safe across sessions)."""
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            build(tmp)
            try:
                os.rename(tmp, target)
            except OSError:  # another session finished first
                if not target.exists():
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
