"""Calibration hidden states kept on disk (memory-mapped) instead of in RAM, for models too big for memory.

The hidden states entering each layer are [n, seq, d] float32 — 128 × 2048 × 8192 × 4 B = 8.6 GB
for a 70B model at the default calibration size. `HiddenFiles(directory, shape)` holds two
memory-mapped files of that shape and hands them out alternately: layer i reads one and writes
its outputs into the other, so RAM holds only the pages in use (the OS may evict them at will).
The files are deleted by close() or when the object is garbage collected.
"""

from __future__ import annotations

import os
import uuid
import weakref
from pathlib import Path

import numpy as np
import torch


def _unlink(paths: list[Path]) -> None:
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


class HiddenFiles:
    """Two float32 memory-mapped buffers of `shape` in `directory` (created if needed), used in turn."""

    def __init__(self, directory, shape: tuple[int, ...]) -> None:
        self.directory = Path(directory).expanduser()
        self.directory.mkdir(parents=True, exist_ok=True)
        tag = uuid.uuid4().hex[:12]
        self.paths = [self.directory / f".prinmix-hidden-{tag}-{k}.f32" for k in (0, 1)]
        self.shape = tuple(int(s) for s in shape)
        self._turn = 0
        self._finalizer = weakref.finalize(self, _unlink, list(self.paths))
        self.buffers = [torch.from_numpy(np.memmap(p, dtype=np.float32, mode="w+", shape=self.shape))
                        for p in self.paths]

    def next(self) -> torch.Tensor:
        """The buffer not handed out last time: a CPU float32 tensor of `shape` backed by its file."""
        buffer = self.buffers[self._turn]
        self._turn ^= 1
        return buffer

    def close(self) -> None:
        """Drop the mappings and delete the files (the tensors handed out must no longer be used)."""
        self.buffers = []
        self._finalizer()
