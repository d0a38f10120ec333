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


def memory_available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (None where it cannot be read, e.g. not Linux)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def offload_advice(shape: tuple[int, ...], available: int | None = None) -> str | None:
    """A one-line suggestion to pass --offload when the two float32 hidden-state buffers of `shape`
    ([n, seq, d]: each layer's input and output) would take over half the available memory, else None."""
    need = 2 * 4 * int(np.prod(shape))
    available = memory_available_bytes() if available is None else available
    if available is None or need <= available // 2:
        return None
    return (f"the calibration hidden states take {need / 2 ** 30:.1f} GiB in RAM (2 × {list(shape)} float32) of "
            f"{available / 2 ** 30:.1f} GiB available; pass --offload DIR to keep them in memory-mapped files "
            f"(or lower --nsamples/--seqlen)")


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
