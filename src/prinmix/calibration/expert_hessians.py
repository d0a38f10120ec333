"""Per-expert Hessians of fused mixture-of-experts parameters (transformers 5 `…Experts` modules).

The experts of Mixtral / Qwen2-MoE / OLMoE / Qwen3-MoE … are one 3-D parameter per projection
(`gate_up_proj` [E, 2·I, H], `down_proj` [E, H, I]); the eager forward applies expert e as
`F.linear(x_e, param[e])` to the tokens x_e routed to it. `ExpertCapture` is a TorchFunctionMode
that sees each `param[e]` indexing and the F.linear call it feeds, and accumulates
H_e = Σ x xᵀ [in, in] (float32, on the layer's device) over exactly the tokens routed to expert e.
Every checkpoint matrix cut from param[e] (rows of it: w1 and w3 both come from gate_up_proj[e])
shares that H_e.

Experts that saw few calibration tokens: with n tokens and input width d, H_e has rank ≤ n, so the
error it weights ignores the directions the expert never saw. `regularised` adds
(1 − n/d) · mean(diag H_e) · I when n < d (an isotropic prior worth up to d pseudo-tokens, fading
out as n → d); an expert with no token at all gets no Hessian (the compressor then minimises the
plain Frobenius error, i.e. identity weighting).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from prinmix.errors import CheckpointError


def regularised(H: torch.Tensor, n_tokens: int) -> torch.Tensor | None:
    """H [d, d] damped toward mean(diag H)·I when n_tokens < d; None when n_tokens == 0 (identity weighting)."""
    d = H.shape[0]
    if n_tokens == 0:
        return None
    if n_tokens < d:
        H = H.clone()
        H.diagonal().add_((1.0 - n_tokens / d) * H.diagonal().mean())
    return H


class ExpertCapture(TorchFunctionMode):
    """Context manager accumulating {(parameter name, expert): HessianStat} while `layer` runs.

    parameters: layer-relative names of the fused 3-D expert parameters to watch.
    """

    def __init__(self, layer: nn.Module, parameters: list[str], stat_factory) -> None:
        super().__init__()
        self.layer_name = type(layer).__name__
        self.watched = {id(layer.get_parameter(n)): n for n in parameters}
        self.owners = {n.rpartition(".")[0] for n in parameters}
        self.stat_factory = stat_factory
        self.stats: dict[tuple[str, int], object] = {}
        self.slices: dict[int, tuple[str, int, torch.Tensor]] = {}
        self.calls = 0
        self.handles = [layer.get_submodule(o).register_forward_pre_hook(self._count) for o in self.owners]

    def _count(self, module, args) -> None:
        self.calls += 1

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is torch.Tensor.__getitem__ and args and id(args[0]) in self.watched:
            index = args[1]
            if isinstance(index, torch.Tensor) and index.numel() == 1 and not index.is_floating_point():
                index = int(index)
            if isinstance(index, int):
                self.slices[id(out)] = (self.watched[id(args[0])], index, out)  # keep `out` alive: ids stay unique
        elif func is torch.nn.functional.linear:
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            hit = self.slices.get(id(weight))
            if hit is not None and hit[2] is weight:
                x = args[0] if args else kwargs["input"]
                self._accumulate(hit[0], hit[1], x)
        return out

    def _accumulate(self, name: str, expert: int, x: torch.Tensor) -> None:
        rows = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
        stat = self.stats.get((name, expert))
        if stat is None:
            stat = self.stats[(name, expert)] = self.stat_factory(
                torch.zeros(rows.shape[1], rows.shape[1], dtype=torch.float32, device=rows.device), 0, [])
        stat.H.addmm_(rows.T, rows)
        stat.n_tokens += rows.shape[0]

    def end_batch(self) -> None:
        self.slices.clear()

    def close(self) -> dict[tuple[str, int], object]:
        """Remove hooks; check the experts were seen; return stats with few-token experts regularised."""
        for handle in self.handles:
            handle.remove()
        if self.calls and not self.stats:
            raise CheckpointError(f"{self.layer_name}: its experts do not apply F.linear to per-expert slices of "
                                  f"{sorted(self.watched.values())} (unsupported experts implementation)")
        out = {}
        for key, stat in self.stats.items():
            H = regularised(stat.H, stat.n_tokens)
            if H is not None:
                stat.H = H
                out[key] = stat
        return out
