"""BitDelta's scale distillation (Liu et al. 2024, §3.2): after ΔŴ = s·sign(ΔW) per matrix, train
the scales s (one per matrix) so the compressed model's logits match the fine-tune's on calibration
text (mean squared error of the logits, Adam). Everything else stays frozen.

Memory: the fine-tune (teacher) and the base with sign deltas (student) are both held in memory in
float32, so this optional stage does not stream like the rest of the pipeline.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from ..checkpoint.apply_delta import finetuned_tensor
from ..format.delta_file import DeltaFile


class _SignDeltaLinear(nn.Module):
    """y = x (W + s·S)ᵀ + b with a trainable scalar s; W, S frozen. S: ±1 float [out, in]."""

    def __init__(self, linear: nn.Linear, signs: torch.Tensor, scale: float):
        super().__init__()
        self.linear = linear
        self.register_buffer("signs", signs)
        self.scale = nn.Parameter(torch.tensor(float(scale)))

    def forward(self, x):
        return nn.functional.linear(x, self.linear.weight + self.scale * self.signs, self.linear.bias)


def distill_bitdelta_scales(base_r, ft_r, delta: DeltaFile, input_ids: torch.Tensor, steps: int = 200,
                            lr: float = 1e-4, batch_size: int = 4, device="cpu", seed: int = 0) -> list[float]:
    """Update the scale of every BitDelta matrix of `delta` in place; returns the loss per step.

    input_ids: LongTensor [n, seq] calibration tokens. base_r / ft_r: CheckpointReaders.
    """
    teacher = AutoModelForCausalLM.from_pretrained(str(ft_r.path), dtype=torch.float32).to(device).eval()
    student = AutoModelForCausalLM.from_config(ft_r.config, dtype=torch.float32)
    state = {}
    for name in student.state_dict():
        if name in delta.matrices:
            state[name] = base_r.get(name, torch.float32)
        elif name in delta.dense or name in delta.rows or name in base_r:
            state[name] = finetuned_tensor(name, base_r, delta, torch.float32)
    if ft_r.tied_embeddings:
        state.pop("lm_head.weight", None)
    student.load_state_dict(state, strict=False)
    student.tie_weights()
    wrapped = []
    for name, m in delta.matrices.items():
        if m.sign is None:
            continue
        module_name = name[: -len(".weight")]
        parent_name, _, child = module_name.rpartition(".")
        parent = student.get_submodule(parent_name)
        signs = m.sign.positive.to(torch.float32) * 2 - 1
        layer = _SignDeltaLinear(getattr(parent, child), signs, float(m.sign.scale))
        setattr(parent, child, layer)
        wrapped.append((name, layer))
    student.to(device).eval()
    for p in student.parameters():
        p.requires_grad_(False)
    params = [layer.scale for _, layer in wrapped]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, input_ids.shape[0], (min(batch_size, input_ids.shape[0]),), generator=g)
        ids = input_ids[idx].to(device)
        with torch.no_grad():
            target = teacher(ids).logits
        loss = nn.functional.mse_loss(student(ids).logits, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    for name, layer in wrapped:
        delta.matrices[name].sign.scale = layer.scale.detach().to(torch.float16).cpu().reshape(())
    return losses
