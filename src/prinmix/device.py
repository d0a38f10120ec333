"""`--device` strings (auto, cpu, cuda, cuda:1…) resolved to a torch.device, with a one-line error."""

from __future__ import annotations

import torch

from .errors import DeviceError

__all__ = ["resolve_device"]


def resolve_device(device: str) -> torch.device:
    """"auto" → cuda when available, else cpu; anything else validated (DeviceError when CUDA is absent)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(f"--device {device}: CUDA is not available on this machine")
    try:
        return torch.device(device)
    except RuntimeError:
        raise DeviceError(f"unknown device {device!r}") from None
