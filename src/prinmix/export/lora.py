"""Export a delta file as a PEFT LoRA adapter that vLLM's `--enable-lora` serves as is.

Per compressed linear `<path>.weight` (ΔŴ = Σ_b Û_b diag(σ_b) V̂_b) the adapter holds
    base_model.model.<path>.lora_A.weight = V̂     [r, h_in]
    base_model.model.<path>.lora_B.weight = Û·Σ   [h_out, r]
with lora_alpha = r, so the LoRA scale alpha/r is 1 and x + B A x reproduces base + ΔŴ.

Ranks: vLLM reads only r and lora_alpha from adapter_config.json (rank_pattern / alpha_pattern are
dropped by its PEFTHelper) and scales every module by lora_alpha / r, so modules of smaller rank are
padded with zero ranks up to r; PEFT then needs no patterns either. With `max_rank` (one of vLLM's
--max-lora-rank values) a module of larger rank is replaced by the best rank-max_rank approximation
of its ΔŴ (Eckart–Young, from a QR of both factors and an SVD of the k×k core): the dropped
singular directions of ΔŴ are those whose removal costs the least Frobenius error, and no rank-r
adapter has less. Error measure reported: relative Frobenius error ‖ΔŴ − B A‖_F / ‖ΔŴ‖_F per module
and over all exported modules (√ of summed squares), before and after casting to `dtype`.

Not exportable: BitDelta (a full-rank sign matrix) and, unless allow_lossy, tensors that differ
outside the linears (norms, biases, embedding / lm_head rows, exact or compressed), which this export
does not carry.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..algorithms.lowrank_svd import svd_of_product
from ..checkpoint.apply_delta import check_base
from ..checkpoint.reader import CheckpointReader
from ..errors import PrinmixError
from ..format.atomic_dir import atomic_directory
from ..format.delta_file import load_delta
from ..format.output_safety import LORA_ADAPTER, check_output_directory, refuse_input_overlap, write_marker
from .vllm_limits import VLLM_MAX_LORA_RANKS

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def best_rank_factors(b: torch.Tensor, a: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B' [h_out, rank], A' [rank, h_in]) minimising ‖B A − B' A'‖_F, for B [h_out, k], A [k, h_in]
    (float64): the leading singular triplets of B A, Σ folded into B'."""
    u, s, vh = svd_of_product(b, a, out_dtype=torch.float64)
    return u[:, :rank] * s[:rank], vh[:rank]


def _frob2_of_difference(b: torch.Tensor, a: torch.Tensor, b2: torch.Tensor, a2: torch.Tensor) -> float:
    """‖B A − B₂ A₂‖²_F from k×k Gram matrices (no dense h_out × h_in product), float64."""
    c = torch.cat([b.double(), -b2.double()], 1)
    d = torch.cat([a.double(), a2.double()], 0)
    return float(((c.T @ c) * (d @ d.T)).sum().clamp_min(0))


def _frob2(b: torch.Tensor, a: torch.Tensor) -> float:
    return float(((b.double().T @ b.double()) * (a.double() @ a.double().T)).sum().clamp_min(0))


def _rel(err2: float, ref2: float) -> float:
    return (err2 / ref2) ** 0.5 if ref2 > 0 else 0.0


def export_lora(base_dir, delta_path, out_dir, max_rank: int | None = None, dtype: torch.dtype = torch.float16,
                allow_lossy: bool = False, overwrite: bool = False) -> dict:
    """Write OUT_DIR/adapter_config.json + adapter_model.safetensors; returns the report (ranks, errors,
    what was left out). Atomic: built in a temporary sibling directory, then renamed."""
    if max_rank is not None and max_rank not in VLLM_MAX_LORA_RANKS:
        raise PrinmixError(f"max_rank {max_rank} is not a vLLM --max-lora-rank value "
                           f"({', '.join(map(str, VLLM_MAX_LORA_RANKS))})")
    if dtype not in DTYPES.values():
        raise PrinmixError(f"dtype {dtype} not supported: use float16, bfloat16 or float32")
    refuse_input_overlap([out_dir], [base_dir, delta_path], "export-lora")
    base = CheckpointReader(base_dir)
    delta = load_delta(delta_path)
    check_base(base, delta, delta_path)
    if any(m.sign is not None for m in delta.matrices.values()):
        raise PrinmixError(f"{delta_path}: a BitDelta delta is a full-rank sign matrix and has no LoRA form; "
                           f"serve it with prinmix or merge it")
    left_out = {n: t.numel() * t.element_size() for n, t in delta.dense.items()}
    left_out.update({n: i.numel() * i.element_size() + v.numel() * v.element_size()
                     for n, (i, v, _) in delta.rows.items()})
    left_out.update({n: b for n, b in delta.vocab_bytes().items()})     # compressed embedding / lm_head rows
    left_out.update({n: 0 for n in delta.params.get("removed_tensors", [])})
    if left_out and not allow_lossy:
        raise PrinmixError(f"{delta_path}: {len(left_out)} tensors outside the linear layers differ "
                           f"({sum(left_out.values())} bytes: {', '.join(sorted(left_out)[:3])}"
                           f"{', …' if len(left_out) > 3 else ''}); a LoRA adapter cannot carry them "
                           f"(allow_lossy / --allow-lossy exports without them)")
    out_dir = Path(out_dir)
    check_output_directory(out_dir, overwrite, LORA_ADAPTER)

    factors, modules = {}, {}
    trunc2 = total2 = ref2 = 0.0
    for name, m in sorted(delta.matrices.items()):
        if not name.endswith(".weight"):
            raise PrinmixError(f"{delta_path}: matrix {name!r} is not a module weight")
        b, a = m.factors(torch.float32)
        k = a.shape[0]
        if k == 0:
            continue
        path = name[: -len(".weight")]
        b2, a2 = (best_rank_factors(b, a, max_rank) if max_rank is not None and k > max_rank
                  else (b.double(), a.double()))
        r2 = _frob2(b, a)
        t2 = _frob2_of_difference(b, a, b2, a2) if a2.shape[0] < k else 0.0
        ref2, trunc2 = ref2 + r2, trunc2 + t2
        modules[path] = {"shape": list(m.shape), "rank": k, "exported_rank": a2.shape[0],
                         "truncation_rel_error": _rel(t2, r2)}
        factors[path] = (b, a, b2, a2)
    if not factors:
        raise PrinmixError(f"{delta_path}: no linear deltas to export")
    r = max(f[3].shape[0] for f in factors.values())

    tensors = {}
    for path, (b, a, b2, a2) in factors.items():
        h_out, h_in = b.shape[0], a.shape[1]
        lora_a = torch.zeros(r, h_in, dtype=dtype)
        lora_b = torch.zeros(h_out, r, dtype=dtype)
        lora_a[: a2.shape[0]] = a2.to(dtype)
        lora_b[:, : b2.shape[1]] = b2.to(dtype)
        tensors[f"base_model.model.{path}.lora_A.weight"] = lora_a.contiguous()
        tensors[f"base_model.model.{path}.lora_B.weight"] = lora_b.contiguous()
        e2 = _frob2_of_difference(b, a, lora_b.double(), lora_a.double())
        total2 += e2
        modules[path]["rel_error"] = _rel(e2, _frob2(b, a))

    targets = sorted({p.rsplit(".", 1)[-1] for p in factors})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": r,
              "target_modules": targets, "bias": "none", "lora_dropout": 0.0, "fan_in_fan_out": False,
              "modules_to_save": None, "use_rslora": False, "use_dora": False, "inference_mode": True,
              "init_lora_weights": True, "rank_pattern": {}, "alpha_pattern": {},
              "base_model_name_or_path": str(Path(base_dir).resolve())}
    with atomic_directory(out_dir) as tmp:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        write_marker(tmp, LORA_ADAPTER)
    return {"out_dir": str(out_dir), "r": r, "lora_alpha": r, "target_modules": targets,
            "vllm_max_lora_rank": next((v for v in VLLM_MAX_LORA_RANKS if v >= r), None),
            "truncated": any(m["exported_rank"] < m["rank"] for m in modules.values()),
            "error_measure": "relative Frobenius error ||dW - B A||_F / ||dW||_F of the delta file's linear deltas",
            "truncation_rel_error": _rel(trunc2, ref2), "rel_error": _rel(total2, ref2),
            "dtype": str(dtype).replace("torch.", ""), "modules": modules, "left_out": left_out,
            "adapter_bytes": (out_dir / "adapter_model.safetensors").stat().st_size}
