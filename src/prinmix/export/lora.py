"""Export a delta file — a whole fine-tune, not only its linear deltas — as a PEFT LoRA adapter that
vLLM's `--enable-lora` serves as is.

What the adapter carries, each module as ΔW = B·A (B = lora_B [h_out, r], A = lora_A [r, h_in]):
- compressed linears `<path>.weight` (ΔŴ = Σ_b Û_b diag(σ_b) V̂_b): B = Û·Σ, A = V̂;
- changed norm weights, folded into the linears reading the normed activations
  (prinmix.export.norm_fold): ΔW_eff = ΔŴ·diag(ρ) + W_base·diag(ρ − 1), ρ = g_ft / g_base, for
  q/k/v and gate/up (per-layer norms) and lm_head (the final norm);
- embedding rows: ΔE = E_ft − E_base [vocab, d] as LoRA on `embed_tokens` in PEFT's embedding layout
  lora_embedding_A = A [r, vocab], lora_embedding_B = B [d, r], ΔEᵀ = B·A (vLLM 0.32's
  VocabParallelEmbeddingWithLoRA reads the same layout and checks A's vocabulary size);
- lm_head: ΔW = W_lm,ft·diag(ρ_final) − W_lm,base [vocab, d] as LoRA on `lm_head` (vLLM wraps it in
  LogitsProcessorWithLoRA). Tied embeddings: lm_head is the embedding in both models, so a tied
  fine-tune whose embedding or final norm changed gets an `lm_head` LoRA holding E_ft·diag(ρ) − E_base
  beside the `embed_tokens` one (both PEFT and vLLM keep the two LoRAs apart over the shared weight).
Each module's exact ΔW is factored — compressed factors as stored (linears, compressed embedding rows),
one SVD of the factors where a norm is folded in, an SVD of the changed rows for exact rows — and, with
`max_rank` (one of vLLM's --max-lora-rank values, at most 512), cut to its best rank-max_rank approximation
(Eckart–Young; a folded module is already in SVD form, so the cut is its first max_rank ranks).

Ranks: vLLM reads only r and lora_alpha from adapter_config.json (rank_pattern / alpha_pattern are
dropped by its PEFTHelper) and scales every module by lora_alpha / r, so modules of smaller rank are
padded with zero ranks up to r = the largest module rank, and lora_alpha = r (scale 1).

Refused (PrinmixError naming the tensor), unless allow_lossy leaves them out and says so:
- bias changes (vLLM 0.32 loads no LoRA bias: its parse_fine_tuned_lora_name rejects lora_B.bias);
- norms that cannot be folded (norm_fold: residual-stream norms, q/k norms, unknown architectures,
  zero base weights), other changed tensors, removed tensors;
- embedding deltas of Gemma models (their embedding scale √d is applied inside the embedding module
  in transformers but outside it in vLLM: PEFT and vLLM would scale the LoRA rows differently).
Always refused: BitDelta (a full-rank sign matrix) and added vocabulary (vLLM removed LoRA extra
vocabulary, vllm PR #28382: an adapter's embedding must have the base's vocabulary size).

Error reported: the whole model's (prinmix.evaluate.adapter_check): logits of base + adapter (PEFT)
against `prinmix merge` (and the fine-tune), plus each module's relative Frobenius truncation error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..algorithms.lowrank_svd import svd_of_product
from ..checkpoint.apply_delta import check_base, finetuned_tensor, output_tensor_names
from ..checkpoint.reader import CheckpointReader
from ..errors import PrinmixError
from ..evaluate.adapter_check import whole_model_check
from ..format.atomic_dir import atomic_directory
from ..format.delta_file import DeltaFile, load_delta
from ..format.output_safety import LORA_ADAPTER, check_output_directory, refuse_input_overlap, write_marker
from .norm_fold import NormFoldError, fold_targets, norm_ratio
from .vllm_limits import VLLM_MAX_LORA_RANKS

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
EMBEDDING = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"
NO_EMBEDDING_LORA = ("gemma", "gemma2", "gemma3", "gemma3_text")


@dataclass
class ModuleDelta:
    """One adapter module's exact delta ΔW = B·A (float64; B [h_out, k], A [k, h_in]). embedding: ΔW is
    ΔEᵀ [d, vocab] (PEFT's lora_embedding_B / lora_embedding_A). svd_form: B = U·Σ and A = Vh of ΔW's thin
    SVD, σ descending, so its best rank-r approximation is the first r ranks (no further SVD)."""

    b: torch.Tensor
    a: torch.Tensor
    embedding: bool = False
    folded: bool = False
    svd_form: bool = False


def best_rank_factors(b: torch.Tensor, a: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B' [h_out, rank], A' [rank, h_in]) minimising ‖B A − B' A'‖_F, for B [h_out, k], A [k, h_in]
    (float64): the leading singular triplets of B A, Σ folded into B'."""
    u, s, vh = svd_of_product(b, a, out_dtype=torch.float64)
    return u[:, :rank] * s[:rank], vh[:rank]


def _frob2_of_difference(b: torch.Tensor, a: torch.Tensor, b2: torch.Tensor, a2: torch.Tensor) -> float:
    """‖B A − B₂ A₂‖²_F in float64, B [h_out, k], A [k, h_in], B₂ [h_out, q], A₂ [q, h_in]: from the
    (k+q)×(k+q) Gram matrices of C = [B, −B₂] and D = [A; A₂] (‖C D‖² = Σ (CᵀC) ⊙ (D Dᵀ), (h_out + h_in)·(k+q)²
    multiply-adds) or from the dense product C·D (h_out·h_in·(k+q)), whichever costs less — a folded
    576-wide module of rank 576 truncated to 512 costs 2.6× less dense, a vocabulary module by Gram."""
    c = torch.cat([b.double(), -b2.double()], 1)
    d = torch.cat([a.double(), a2.double()], 0)
    (h_out, k), h_in = c.shape, d.shape[1]
    if h_out * h_in <= (h_out + h_in) * k:
        return float((c @ d).square().sum())
    return float(((c.T @ c) * (d @ d.T)).sum().clamp_min(0))


def _frob2(b: torch.Tensor, a: torch.Tensor) -> float:
    """‖B A‖²_F in float64 (as _frob2_of_difference)."""
    return _frob2_of_difference(b, a, b[:, :0], a[:0])


def _rel(err2: float, ref2: float) -> float:
    return (err2 / ref2) ** 0.5 if ref2 > 0 else 0.0


def factors_of_rows(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(U·Σ [n, q], Vh [q, d]) with delta = U·Σ·Vh exactly (float64), from an SVD of its non-zero rows
    only (a fine-tune touching few embedding rows costs an SVD of those rows); q = numerical rank."""
    rows = delta.ne(0).any(1).nonzero().flatten()
    u_s = torch.zeros(delta.shape[0], 0, dtype=torch.float64)
    if rows.numel() == 0:
        return u_s, torch.zeros(0, delta.shape[1], dtype=torch.float64)
    u, s, vh = torch.linalg.svd(delta[rows].double(), full_matrices=False)
    q = int((s > s[0] * 1e-12).sum())
    u_s = torch.zeros(delta.shape[0], q, dtype=torch.float64)
    u_s[rows] = u[:, :q] * s[:q]
    return u_s, vh[:q]


def _compact(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same product in SVD form (U·Σ, Vh) with at most min(h_out, h_in) ranks (a folded delta has
    k + |S| columns), its numerical rank kept (exact SVD of the factors, float64)."""
    u, s, vh = svd_of_product(b, a, out_dtype=torch.float64)
    q = int((s > s[0] * 1e-12).sum()) if s.numel() else 0
    return u[:, :q] * s[:q], vh[:q]


def fold_norm(b: torch.Tensor, a: torch.Tensor, w_base: torch.Tensor, rho: torch.Tensor) -> ModuleDelta:
    """ΔW_eff = B·A·diag(ρ) + W_base·diag(ρ − 1) (norm_fold) as factors in SVD form, float64.

    B [h_out, k], A [k, h_in], W_base [h_out, h_in], ρ [h_in]. Only the changed features S = {j: ρ_j ≠ 1}
    add ranks: B' = [B, W_base[:, S]·(ρ_S − 1)], A' = [A·diag(ρ); e_S] (e_S: unit rows selecting S), then
    one SVD of that product (_compact) caps the rank at min(h_out, h_in)."""
    changed = (rho != 1).nonzero().flatten()
    selector = torch.zeros(changed.numel(), w_base.shape[1], dtype=torch.float64)
    selector[torch.arange(changed.numel()), changed] = 1.0
    b_fold = torch.cat([b, w_base[:, changed].double() * (rho[changed] - 1)], 1)
    a_fold = torch.cat([a * rho, selector], 0)
    return ModuleDelta(*_compact(b_fold, a_fold), folded=True, svd_form=True)


def row_delta_factors(name: str, base: CheckpointReader, delta: DeltaFile) -> tuple[torch.Tensor, torch.Tensor]:
    """(L [V, k], R [k, d]) float64 with ΔE = E_ft − E_base = L·R for the vocabulary matrix `name` [V, d].

    Compressed rows (whole-delta mode, delta.vocab: ΔŴ_R = B·A for the changed rows R) are already
    low-rank factors: L = B scattered to the rows R, R = A — exact, k = the compressed rank, no SVD of
    the V×d matrix. (An SVD of the dense difference would see, besides those k ranks, the float32 rounding
    of base + ΔŴ as up to d − k spurious ranks.) Exact rows and dense replacements: an SVD of the changed
    rows (factors_of_rows)."""
    if name in delta.vocab and name not in delta.rows and name not in delta.dense:
        idx, m, shape = delta.vocab[name]
        b, a = m.factors(torch.float32)
        left = torch.zeros(shape[0], b.shape[1], dtype=torch.float64)
        left[idx] = b.double()
        return left, a.double()
    return factors_of_rows(finetuned_tensor(name, base, delta, torch.float64) - base.get(name, torch.float64))


def _vocabulary_deltas(base: CheckpointReader, delta: DeltaFile, delta_path, ratios: dict[str, torch.Tensor],
                       allow_lossy: bool, left_out: dict) -> dict[str, ModuleDelta]:
    """embed_tokens / lm_head modules: their row deltas, exact or compressed (row_delta_factors),
    lm_head with the final norm folded in."""
    names = set(output_tensor_names(base, delta))
    for name, (_, _, shape) in delta.rows.items():
        if name not in base or shape[0] != base.shape(name)[0]:
            raise PrinmixError(f"{delta_path}: {name} has {shape[0]} rows, the base "
                               f"{base.shape(name)[0] if name in base else 'none'}: added vocabulary; vLLM 0.32 "
                               f"serves no LoRA extra vocabulary (adapters must keep the base's vocabulary): "
                               f"merge the delta and serve the merged model instead")
        if name not in (EMBEDDING, LM_HEAD):
            raise PrinmixError(f"{delta_path}: row delta of {name}, which is neither {EMBEDDING} nor {LM_HEAD}")
    modules = {}
    embedding_changed = EMBEDDING in delta.rows or EMBEDDING in delta.vocab
    if embedding_changed:
        if base.model_type in NO_EMBEDDING_LORA:
            message = (f"{EMBEDDING}: changed, and {base.model_type!r} scales embeddings by √d inside the embedding "
                       f"module in transformers but outside it in vLLM, so its LoRA rows would be scaled differently")
            if not allow_lossy:
                raise PrinmixError(f"{delta_path}: {message}")
            left_out[EMBEDDING] = message
        embedding_factors = row_delta_factors(EMBEDDING, base, delta)
        if base.model_type not in NO_EMBEDDING_LORA:
            left, right = embedding_factors
            modules["model.embed_tokens"] = ModuleDelta(right.T.contiguous(), left.T.contiguous(), embedding=True)
    rho = ratios.get(LM_HEAD)
    head_changed = LM_HEAD in delta.rows or LM_HEAD in delta.vocab or LM_HEAD in delta.dense or rho is not None
    tied_and_changed = LM_HEAD not in names and embedding_changed
    if head_changed or tied_and_changed:
        head = LM_HEAD if LM_HEAD in names else EMBEDDING        # tied: lm_head is the (fine-tuned) embedding
        if head == EMBEDDING:
            left, right = embedding_factors if embedding_changed else (
                torch.zeros(base.shape(EMBEDDING)[0], 0, dtype=torch.float64),
                torch.zeros(0, base.shape(EMBEDDING)[1], dtype=torch.float64))
        else:
            left, right = row_delta_factors(LM_HEAD, base, delta)
        if rho is None:
            modules["lm_head"] = ModuleDelta(left, right)
        else:
            w_base = base.get(LM_HEAD if LM_HEAD in base else EMBEDDING, torch.float64)
            modules["lm_head"] = fold_norm(left, right, w_base, rho)
    return modules


def collect_module_deltas(base: CheckpointReader, delta: DeltaFile, delta_path,
                          allow_lossy: bool = False) -> tuple[dict[str, ModuleDelta], dict[str, str]]:
    """({module path: its exact ΔW as factors}, {tensor left out: why}) of a whole fine-tune's delta.

    Every changed tensor is either carried exactly or refused (PrinmixError naming it), unless
    allow_lossy, which leaves it out and records why.
    """
    left_out: dict[str, str] = {}

    def refuse(name: str, why: str) -> None:
        if not allow_lossy:
            raise PrinmixError(f"{delta_path}: {why} (allow_lossy / --allow-lossy exports without it)")
        left_out[name] = why

    for name in delta.params.get("removed_tensors", []):
        refuse(name, f"{name} is removed in the fine-tune; a LoRA adapter cannot remove a tensor")
    ratios: dict[str, torch.Tensor] = {}                        # consumer weight name -> ρ of its input norm
    for name, t in sorted(delta.dense.items()):
        if name.endswith(".bias"):
            refuse(name, f"{name} changed; vLLM 0.32 serves no LoRA bias")
        elif t.ndim == 1 and name.endswith("norm.weight"):
            try:
                targets = fold_targets(base.model_type, name)
                rho = norm_ratio(base.model_type, name, base.get(name, torch.float64), t)
            except NormFoldError as e:
                refuse(name, str(e))
                continue
            for target in targets:
                ratios[target] = rho
        elif name != LM_HEAD:
            refuse(name, f"{name} changed and is neither a linear, a norm nor an embedding/lm_head row")

    modules: dict[str, ModuleDelta] = {}
    for name, m in sorted(delta.matrices.items()):
        if not name.endswith(".weight"):
            raise PrinmixError(f"{delta_path}: matrix {name!r} is not a module weight")
        b, a = (t.double() for t in m.factors(torch.float32))
        modules[name[: -len(".weight")]] = ModuleDelta(b, a)
    for target, rho in ratios.items():
        if target == LM_HEAD:
            continue
        path = target[: -len(".weight")]
        w_base = base.get(target, torch.float64)
        m = modules.get(path) or ModuleDelta(torch.zeros(w_base.shape[0], 0, dtype=torch.float64),
                                             torch.zeros(0, w_base.shape[1], dtype=torch.float64))
        modules[path] = fold_norm(m.b, m.a, w_base, rho)
    modules.update(_vocabulary_deltas(base, delta, delta_path, ratios, allow_lossy, left_out))
    return {p: m for p, m in modules.items() if m.a.shape[0] > 0}, left_out


def export_lora(base_dir, delta_path, out_dir, max_rank: int | None = None, dtype: torch.dtype = torch.float16,
                allow_lossy: bool = False, overwrite: bool = False, check: bool = True, finetuned=None,
                check_text: str | None = None, check_tokens: int = 512) -> dict:
    """Write OUT_DIR/adapter_config.json + adapter_model.safetensors; returns the report (ranks, errors,
    what was left out, and with `check` the whole-model comparison of adapter_check). Atomic: built in a
    temporary sibling directory, then renamed."""
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
    out_dir = Path(out_dir)
    check_output_directory(out_dir, overwrite, LORA_ADAPTER)
    deltas, left_out = collect_module_deltas(base, delta, delta_path, allow_lossy)
    if not deltas:
        raise PrinmixError(f"{delta_path}: nothing a LoRA adapter can carry differs from the base")

    factors, modules = {}, {}
    trunc2 = ref2 = 0.0
    for path, m in sorted(deltas.items()):
        k = m.a.shape[0]
        if max_rank is None or k <= max_rank:
            b2, a2 = m.b, m.a
        elif m.svd_form:
            b2, a2 = m.b[:, :max_rank], m.a[:max_rank]
        else:
            b2, a2 = best_rank_factors(m.b, m.a, max_rank)
        if m.svd_form:      # B = U·Σ, A = Vh (orthonormal rows): ‖B A‖² = ‖B‖², the cut ranks' ‖B_tail‖²
            r2, t2 = float(m.b.square().sum()), float(m.b[:, a2.shape[0]:].square().sum())
        else:
            r2 = _frob2(m.b, m.a)
            t2 = _frob2_of_difference(m.b, m.a, b2, a2) if a2.shape[0] < k else 0.0
        ref2, trunc2 = ref2 + r2, trunc2 + t2
        modules[path] = {"shape": [m.b.shape[0], m.a.shape[1]], "rank": k, "exported_rank": a2.shape[0],
                         "folded_norm": m.folded, "embedding": m.embedding, "truncation_rel_error": _rel(t2, r2)}
        factors[path] = (m, b2, a2)
    r = max(f[2].shape[0] for f in factors.values())

    tensors, total2 = {}, 0.0
    for path, (m, b2, a2) in factors.items():
        lora_a = torch.zeros(r, m.a.shape[1], dtype=dtype)
        lora_b = torch.zeros(m.b.shape[0], r, dtype=dtype)
        lora_a[: a2.shape[0]] = a2.to(dtype)
        lora_b[:, : b2.shape[1]] = b2.to(dtype)
        a_key, b_key = (("lora_embedding_A", "lora_embedding_B") if m.embedding
                        else ("lora_A.weight", "lora_B.weight"))
        tensors[f"base_model.model.{path}.{a_key}"] = lora_a.contiguous()
        tensors[f"base_model.model.{path}.{b_key}"] = lora_b.contiguous()
        e2 = _frob2_of_difference(m.b, m.a, b2.to(dtype), a2.to(dtype))   # the zero padding adds nothing
        total2 += e2
        modules[path]["rel_error"] = _rel(e2, _frob2(m.b, m.a))

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
    report = {"out_dir": str(out_dir), "r": r, "lora_alpha": r, "target_modules": targets,
              "vllm_max_lora_rank": next((v for v in VLLM_MAX_LORA_RANKS if v >= r), None),
              "truncated": any(m["exported_rank"] < m["rank"] for m in modules.values()),
              "factor_error_measure": "relative Frobenius error ||dW - B A||_F / ||dW||_F of each module's exact "
                                      "delta (norms folded in), summed over modules",
              "truncation_rel_error": _rel(trunc2, ref2), "rel_error": _rel(total2, ref2),
              "dtype": str(dtype).replace("torch.", ""), "modules": modules, "left_out": left_out,
              "adapter_bytes": (out_dir / "adapter_model.safetensors").stat().st_size, "whole_model": None}
    if check:
        report["whole_model"] = whole_model_check(base_dir, delta_path, out_dir, finetuned, check_text, check_tokens)
    return report

