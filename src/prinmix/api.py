"""The Python API: compress, merge, load_delta, info. The CLI is a thin shell over these.

Calibration activations (decision): layer i's Hessian H = XXᵀ is taken on the hidden states of the
*reconstructed* model — base + the compressed deltas of layers 0..i-1 — i.e. what the served model
will feed layer i (GPTQ's sequential order). Inside layer i the inputs of each linear come from the
layer run with the fine-tune's weights, so q/k/v/o and gate/up/down all see the same stream.
After compressing layer i, the hidden states are propagated through base + ΔŴ (compressed) of
layer i. tests/test_api.py checks this against a direct computation on the merged model.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .algorithms.budget import parse_ratio
from .algorithms.compress_matrix import DEFAULT_WIDTHS, METHODS, PrinMixConfig, compress_matrix
from .algorithms.lowrank_svd import FactoredDelta
from .errors import BudgetError, CheckpointError, DeltaFormatError, DeltaRangeError, DeviceError, PrinmixError
from .format.atomic_dir import atomic_directory
from .format.output_safety import MERGED_CHECKPOINT, check_output_directory, refuse_input_overlap, write_marker
from .format.delta_file import DeltaFile, load_delta as _load_delta, ratio_within_file, save_delta
from .format.resume_part import CHECKSUMS_KEY, part_checksums, part_problem
from .models.apply_delta import (base_fingerprint, check_base, finetuned_tensor, merged_aux_files,
                                 output_tensor_names, split_aux_files, stored_form)
from .models.checkpoint import CheckpointReader, check_compatible
from .models.offload import PackedLinear
from .whole_delta import compress_vocab_parts, plan_whole_budget

CALIBRATED = ("prinmix", "deltacome")


@dataclass
class CompressSummary:
    path: str
    method: str
    ratio_requested: float
    linear_bytes: int          # compressed linear deltas (blobs: codes, scales, zeros, widths, Σ)
    dense_params: int          # 16-bit delta entries those linears stand for
    other_bytes: int           # exact non-linear tensors that differ (norms, biases, embedding rows)
    aux_bytes: int             # config / tokenizer files carried for merge
    file_bytes: int            # the whole file on disk
    seconds: float
    layers: int
    linear_header_bytes: int = 0  # the linear deltas' entries in the file header (upper bound)
    lora_adapter_bytes: int | None = None  # FINETUNED was a LoRA adapter: its factors' 16-bit size
    whole_params: int = 0      # entries of everything that differs (the whole delta's 16-bit size / 2)
    weight_bytes: dict | None = None  # DeltaFile.weight_bytes(): linear / vocab {name} / exact / total
    exact_embeddings: bool = False

    @property
    def ratio_whole(self) -> float:
        """All bytes stored for weights (with their header entries) / 16-bit size of what differs."""
        return self.weight_bytes["total"] / (2 * self.whole_params) if self.whole_params and self.weight_bytes \
            else 0.0

    @property
    def ratio_achieved(self) -> float:
        """Blob bytes / 16-bit size of the linear deltas (the paper's ratio, with every stored byte counted)."""
        return 8 * self.linear_bytes / (16 * self.dense_params) if self.dense_params else 0.0

    @property
    def ratio_on_disk(self) -> float:
        """As ratio_achieved, with the linear deltas' header entries (names, offsets, checksums) counted too."""
        return 8 * (self.linear_bytes + self.linear_header_bytes) / (16 * self.dense_params) \
            if self.dense_params else 0.0


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(f"--device {device}: CUDA is not available on this machine")
    try:
        return torch.device(device)
    except RuntimeError:
        raise DeviceError(f"unknown device {device!r}") from None


def _open_pair(base, finetuned):
    from .models.lora_source import LoraFinetunedReader, is_lora_adapter

    base_r = CheckpointReader(base)
    ft_r = LoraFinetunedReader(base_r, finetuned) if is_lora_adapter(finetuned) else CheckpointReader(finetuned)
    return base_r, ft_r, check_compatible(base_r, ft_r)


def _run_key(args: dict) -> str:
    return hashlib.sha256(json.dumps(args, sort_keys=True).encode()).hexdigest()[:16]


def _load_calibration_ids(ft: CheckpointReader, calib, nsamples, seqlen, seed):
    from transformers import AutoTokenizer

    from .models.calibration import load_calibration

    try:
        tok = AutoTokenizer.from_pretrained(str(getattr(ft, "tokenizer_path", ft.path)))
    except Exception as e:  # noqa: BLE001 - transformers raises many types
        raise CheckpointError(f"{ft.path}: cannot load its tokenizer for calibration ({e})") from None
    return load_calibration(calib, tok, nsamples, seqlen, seed)


def compress(base, finetuned, output, ratio="1/16", method: str = "prinmix", calib: str | None = None,
             nsamples: int = 128, seqlen: int = 2048, widths=DEFAULT_WIDTHS, fmax: int = 4,
             device: str = "auto", batch_size: int = 8, seed: int = 0, resume: bool = True, offload=None,
             progress=None, config: PrinMixConfig | None = None, on_hessians=None,
             distill_steps: int = 0, exact_embeddings: bool = False) -> CompressSummary:
    """Compress FINETUNED against BASE into a delta file at OUTPUT (atomic; resumable).

    ratio: '1/16', 0.0625 or '16x'. progress: None or a callable(done_layers, total_layers, message).
    on_hessians: None or a callable(layer_index, {weight name: H = XXᵀ}) seeing each layer's Hessians.
    offload: None or a directory: the calibration hidden states live there in memory-mapped files, not in RAM.
    FINETUNED may be a PEFT LoRA adapter directory (see models/lora_source.py).
    distill_steps: BitDelta only — Adam steps of scale distillation on the calibration set (0 = off).
    exact_embeddings: α holds for the decoder linears only and every other tensor that differs is stored
    exactly (the earlier behaviour); default: α holds for the whole delta (see whole_delta.py).
    """
    t0 = time.time()
    if method not in METHODS:
        raise PrinmixError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    try:
        alpha = parse_ratio(ratio)
    except ValueError as e:
        raise BudgetError(str(e)) from None
    if method == "bitdelta" and alpha < 1 / 16:
        raise BudgetError(f"bitdelta stores 1 bit per delta entry (ratio 1/16); ratio {ratio} is below it")
    for flag, value in (("nsamples", nsamples), ("seqlen", seqlen), ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise PrinmixError(f"--{flag.replace('_', '-')} must be a positive integer, got {value!r}")
    if distill_steps < 0:
        raise PrinmixError(f"--distill-steps must be ≥ 0, got {distill_steps}")
    if Path(output).is_dir():
        raise PrinmixError(f"{output}: is a directory; give the delta file's path (e.g. {Path(output) / 'model.delta'})")
    refuse_input_overlap([output], [base, finetuned], "compress")
    dev = resolve_device(device)
    base_r, ft_r, compat = _open_pair(base, finetuned)
    check_inputs_finite(base_r, ft_r)  # an Inf in model.norm is found now, not after every layer
    cfg = config or PrinMixConfig(widths=tuple(widths), fmax=fmax)
    try:
        cfg.validate()
    except ValueError as e:
        raise BudgetError(f"invalid bit-width settings (--bits/--fmax): {e}") from None
    output = Path(output)

    from .models.decoder import DecoderStack, run_layer

    stack = DecoderStack(ft_r)
    fingerprint = base_fingerprint(base_r)
    params = {"method": method, "ratio": alpha, "budget": "blob+header", "exact": "base-dtype", "config": asdict(cfg),
              "calib": calib, "nsamples": nsamples, "seqlen": seqlen, "seed": seed,
              # every byte of both models (content_hash(full=True)), not the sampled fingerprint: a model edited
              # only in unsampled bytes must not reuse stale parts (of either: the delta is relative to the base).
              # Cost (benchmarks/bench_resume_key.py, one core): 0.75 s per SmolLM2-135M model (269 MB bf16,
              # 360 MB/s) against 0.12 s sampled; ~6.5 min per 140 GB model (70B), a few % of its compression.
              "base": base_r.content_hash(full=True), "finetuned": ft_r.content_hash(full=True),
              "distill_steps": distill_steps, "whole": not exact_embeddings}
    key = _run_key(params)
    work = output.parent / f".{output.name}.partial-{key}"
    if not resume and work.exists():
        shutil.rmtree(work)

    plan = None if exact_embeddings else plan_whole_budget(stack, base_r, ft_r, compat, alpha,
                                                           fixed_size=method == "bitdelta")
    layer_alpha = alpha if plan is None or method == "bitdelta" else plan.linear_alpha  # BitDelta: fixed size
    inputs = ids = None
    if method in CALIBRATED:
        ids = _load_calibration_ids(ft_r, calib, nsamples, seqlen, seed)
        hidden_files = None
        hidden_shape = (*ids.shape, stack.config.get_text_config().hidden_size)
        if offload:
            from .models.offload import HiddenFiles

            hidden_files = HiddenFiles(offload, hidden_shape)
        elif dev.type == "cpu":
            from .models.offload import offload_advice

            advice = offload_advice(hidden_shape)
            if advice:
                warnings.warn(advice, stacklevel=2)  # a UserWarning: shown by default
        inputs = stack.embed(ft_r, ids, dev, batch_size, out=hidden_files and hidden_files.next())

    aux_files, aux_from_base = split_aux_files(base_r, ft_r)  # files identical to the base's are not stored
    delta = DeltaFile(method, alpha, {"config": asdict(cfg) if method == "prinmix" else {},
                                      "calib": calib, "nsamples": nsamples, "seqlen": seqlen,
                                      "removed_tensors": compat.only_in_base, "aux_from_base": aux_from_base,
                                      "whole": not exact_embeddings, **getattr(ft_r, "delta_params", {})},
                      base_fingerprint=fingerprint, aux_files=aux_files)
    n_layers = stack.num_layers
    for i in range(n_layers):
        part = work / f"layer_{i:05d}.safetensors"
        prefix = stack.layer_prefix(i)
        names = stack.layer_tensor_names(i)
        problem = part_problem(part) if part.exists() else None
        if problem:  # damaged since it was written: compress this layer again
            warnings.warn(f"{part}: {problem}; compressing layer {i} again", stacklevel=2)
            part.unlink()
        if part.exists():
            layer_delta = _load_layer_part(part)
        else:
            layer_delta = _compress_layer(i, stack, base_r, ft_r, inputs, layer_alpha, method, cfg, dev, batch_size,
                                          on_hessians, whole=plan is not None)
            work.mkdir(parents=True, exist_ok=True)  # made only now: a run failing on its inputs leaves nothing
            _save_layer_part(layer_delta, part)
        delta.matrices.update(_mapped_blobs(part))  # bit-packed, memory-mapped from the part: not process RAM
        delta.dense.update(layer_delta.dense)
        if inputs is not None:  # propagate through base + compressed delta of this layer
            state = {n[len(prefix):]: finetuned_tensor(n, base_r, layer_delta, torch.float32)
                     for n in names if n in base_r}
            state.update({n[len(prefix):]: layer_delta.dense[n].float() for n in names if n not in base_r})
            layer = stack.build_layer(i, state, dev)
            out = hidden_files.next() if hidden_files else None
            inputs = inputs.with_hidden(run_layer(layer, inputs, batch_size, out=out))
            del layer, state  # free this layer's weights before the next one is read
        layer_delta = None  # its unpacked codes (1 byte each) must not live through the next layer
        if progress:
            progress(i + 1, n_layers, f"layer {i}")

    counts = head_H = None
    if plan is not None and inputs is not None and any("head" in p.roles for p in plan.vocab if p.changed.numel()):
        # the reconstructed model's last-layer outputs, through the (exactly stored) final norm
        head_H = stack.head_hessian(ft_r, ids, inputs.hidden, dev, batch_size).cpu()
    if plan is not None and ids is not None:
        counts = torch.bincount(ids.flatten().cpu(), minlength=plan.vocab[0].shape[0] if plan.vocab else 0)
    if inputs is not None and hidden_files:
        inputs = None
        hidden_files.close()
    inputs = None
    vocab_report = {}
    if plan is None:
        _add_non_layer_tensors(delta, stack, base_r, ft_r, compat)
    else:
        _add_non_layer_tensors(delta, stack, base_r, ft_r, compat, skip={p.name for p in plan.vocab})
        vocab_report = compress_vocab_parts(delta, plan, base_r, ft_r, method, cfg, counts, head_H, dev)
    if method == "bitdelta" and distill_steps > 0:
        from .models.bitdelta_distill import distill_bitdelta_scales

        ids = _load_calibration_ids(ft_r, calib, nsamples, seqlen, seed)
        distill_bitdelta_scales(base_r, ft_r, delta, ids, steps=distill_steps, device=dev, seed=seed)
        delta.params["distill_steps"] = distill_steps
    delta.stats = {"layers": n_layers, "objective": {n: m.info.get("objective") for n, m in delta.matrices.items()
                                                     if m.info.get("objective") is not None}}
    if plan is not None:
        delta.stats["whole"] = {"linear_ratio": layer_alpha, "vocab": vocab_report}
    file_bytes = save_delta(delta, output)
    shutil.rmtree(work, ignore_errors=True)
    return CompressSummary(str(output), method, alpha, delta.linear_bytes(), delta.dense_delta_params(),
                           delta.dense_bytes(), delta.aux_bytes(), file_bytes, time.time() - t0, n_layers,
                           delta.linear_header_bytes(), delta.params.get("lora_adapter_bytes"),
                           delta.whole_delta_params(), delta.weight_bytes(), exact_embeddings)


def _compress_layer(i, stack, base_r, ft_r, inputs, alpha, method, cfg, dev, batch_size, on_hessians,
                    whole: bool = False) -> DeltaFile:
    """Compress every linear of layer i whose weight differs; keep other differing tensors exactly."""
    from .models.decoder import capture_hessians

    prefix = stack.layer_prefix(i)
    linear_weights = {prefix + n + ".weight" for n in stack.linear_names(i)}
    out = DeltaFile(method, alpha, {})
    hessians = {}
    if inputs is not None:
        state = {n[len(prefix):]: ft_r.get(n, torch.float32) for n in stack.layer_tensor_names(i)}
        layer = stack.build_layer(i, state, dev)
        stats = capture_hessians(layer, inputs, batch_size)
        hessians = {prefix + n + ".weight": s.H for n, s in stats.items()}
        if on_hessians:
            on_hessians(i, dict(hessians))  # a copy: entries are popped below as matrices are done
        del layer, state, stats
    for name in stack.layer_tensor_names(i):
        ft_t = ft_r.get(name, dtype=None)
        if name not in base_r:
            out.dense[name] = ft_t
            continue
        base_t = base_r.get(name, dtype=None)
        if torch.equal(base_t, ft_t.to(base_t.dtype)) and base_t.dtype == ft_t.dtype:
            continue
        if name in linear_weights:
            factors = ft_r.lora_factors(name) if hasattr(ft_r, "lora_factors") else None  # LoRA: ΔW = (s·B)·A
            # LoRA: kept factored (its SVD comes from the factors); else ΔW without a float32 copy of the base
            d = FactoredDelta(*factors) if factors else ft_t.to(torch.float32, copy=True).sub_(base_t)
            ft_t = base_t = factors = None  # free before the compressor's own peak
            if not (d.any() if isinstance(d, FactoredDelta) else torch.any(d)):
                continue
            H = hessians.pop(name, None)  # the last user of a shared H frees it
            # the matrix's header entries come off its budget (BitDelta's size is fixed: 1 bit per entry)
            # (whole-delta mode: headers are paid in the plan, alpha is already the blob's ratio)
            ratio = alpha if method == "bitdelta" or whole else ratio_within_file(alpha, name, d.shape)
            try:
                m = compress_matrix(d.to(dev), None if H is None else H.to(dev), ratio, method, cfg)
            except ValueError as e:  # e.g. a 3e38 entry: its SVD or the layer's activations overflow float32
                if H is not None and not bool(torch.isfinite(H).all()):
                    peak = max(float(ft_r.get(n, torch.float32).abs().max()) for n in stack.layer_tensor_names(i))
                    raise DeltaRangeError(f"{ft_r.path}: layer {i}'s calibration activations overflow float32 at "
                                          f"{name!r} (the fine-tune's weights in this layer reach {peak:.3g})"
                                          ) from None
                raise DeltaRangeError(f"{ft_r.path}: cannot compress the delta of {name!r} ({e}); its largest "
                                      f"entry is {_max_abs(d):.3g}") from None
            bad = m.nonfinite_field()
            if bad is not None:
                raise DeltaRangeError(f"{ft_r.path}: the delta of {name!r} (largest entry {_max_abs(d):.3g}) does not "
                                      f"fit {method}'s float16 fields ({bad} overflows)")
            out.matrices[name] = m.stored_copy()  # blobs are built on CPU
            d = H = None
        else:
            stored = stored_form(ft_t, base_t)
            if not (stored.dtype == base_t.dtype and torch.equal(stored, base_t)):
                out.dense[name] = stored
    return out


def _max_abs(d) -> float:
    return float(d.dense().abs().max() if isinstance(d, FactoredDelta) else d.abs().max())


def check_inputs_finite(*readers) -> None:
    """Read every tensor of each model once and raise CheckpointError (naming the file and tensor) for a
    NaN/Inf, before the long per-layer work. Costs one read of each model (benchmarks/bench_resume_key.py)."""
    for reader in readers:
        for name in reader.tensor_names:
            reader.get(name, dtype=None)  # check_finite: raises CheckpointError


def _save_layer_part(part_delta: DeltaFile, path: Path) -> None:
    tensors = {f"linear/{n}": m.to_blob() for n, m in part_delta.matrices.items()}
    tensors.update({f"dense/{n}": t.contiguous() for n, t in part_delta.dense.items()})
    meta = {"shapes": json.dumps({n: list(m.shape) for n, m in part_delta.matrices.items()}),
            "method": part_delta.method,
            "objective": json.dumps({n: m.info.get("objective") for n, m in part_delta.matrices.items()})}
    meta[CHECKSUMS_KEY] = part_checksums(tensors, meta)  # verified before reuse (format/resume_part.py)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    import os

    os.close(fd)
    save_file(tensors, tmp, metadata=meta)
    os.replace(tmp, path)


def _mapped_blobs(path: Path) -> dict[str, PackedLinear]:
    """The linear blobs of a layer part, as PackedLinear over memory-mapped tensors (safetensors maps the
    file: its pages are file-backed and reclaimable, so 80 layers of compressed blobs cost no anonymous RAM;
    they stay valid after the part file is deleted)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        shapes, objective = json.loads(meta["shapes"]), json.loads(meta["objective"])
        return {name: PackedLinear.from_blob(f.get_tensor(f"linear/{name}"), shape, meta["method"],
                                             {"objective": objective[name]} if objective.get(name) is not None
                                             else {})
                for name, shape in shapes.items()}


def _load_layer_part(path: Path) -> DeltaFile:
    from safetensors import safe_open

    from .algorithms.compressed import CompressedLinear

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    shapes, objective = json.loads(meta["shapes"]), json.loads(meta["objective"])
    out = DeltaFile(meta["method"], 0.0, {})
    for k, t in tensors.items():
        kind, name = k.split("/", 1)
        if kind == "linear":
            m = CompressedLinear.from_blob(t, tuple(shapes[name]), meta["method"])
            if objective.get(name) is not None:
                m.info["objective"] = objective[name]
            out.matrices[name] = m
        else:
            out.dense[name] = t
    return out


def _add_non_layer_tensors(delta: DeltaFile, stack, base_r, ft_r, compat, skip=()) -> None:
    """Embeddings, final norm, lm_head… (but `skip`): exact where they differ; vocabulary rows as row deltas."""
    vocab = getattr(ft_r.config.get_text_config(), "vocab_size", None)
    for name in stack.non_layer_tensor_names:
        if name in skip:
            continue
        ft_t = ft_r.get(name, dtype=None)
        if name not in base_r:
            delta.dense[name] = ft_t
            continue
        base_t = base_r.get(name, dtype=None)
        ft_t = stored_form(ft_t, base_t)
        if ft_t.ndim == 2 and (name in compat.resized_vocab or ft_t.shape[0] == vocab):
            n = min(base_t.shape[0], ft_t.shape[0])
            same = (base_t[:n] == ft_t[:n].to(base_t.dtype)).all(dim=1) & (base_t.dtype == ft_t.dtype)
            changed = torch.nonzero(~same).flatten()
            extra = torch.arange(n, ft_t.shape[0])
            idx = torch.cat([changed, extra])
            if idx.numel() or ft_t.shape[0] != base_t.shape[0]:
                delta.rows[name] = (idx, ft_t[idx].contiguous(), list(ft_t.shape))
        elif not (base_t.dtype == ft_t.dtype and torch.equal(base_t, ft_t)):
            delta.dense[name] = ft_t


def load_delta(path):
    """Read and validate a delta file (see prinmix.format.delta_file)."""
    return _load_delta(path)


def merge(base, delta_path, output, overwrite: bool = False, progress=None) -> Path:
    """Write base + delta as a standard HF checkpoint directory (safetensors + the fine-tune's
    config/tokenizer files). Atomic: built in a temporary sibling directory, then renamed."""
    refuse_input_overlap([output], [base, delta_path], "merge")
    base_r = CheckpointReader(base)
    delta = load_delta(delta_path)
    check_base(base_r, delta, delta_path)
    output = Path(output)
    check_output_directory(output, overwrite, MERGED_CHECKPOINT)
    aux_files = merged_aux_files(base_r, delta, delta_path)  # checked before any work
    with atomic_directory(output) as tmp:
        names = output_tensor_names(base_r, delta)
        shard, shard_bytes, shards, index = {}, 0, [], {}
        limit = 2 * 1024 ** 3

        def flush():
            nonlocal shard, shard_bytes
            if shard:
                fname = f"model-{len(shards) + 1:05d}.safetensors"
                save_file(shard, str(tmp / fname), metadata={"format": "pt"})
                shards.append(fname)
                index.update({n: fname for n in shard})
                shard, shard_bytes = {}, 0

        for j, name in enumerate(names):
            t = finetuned_tensor(name, base_r, delta).contiguous()
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):  # e.g. a delta overflowing fp16
                raise DeltaFormatError(f"{delta_path}: base + delta of {name!r} is not finite in {t.dtype}")
            shard[name] = t
            shard_bytes += t.numel() * t.element_size()
            if shard_bytes >= limit:
                flush()
            if progress:
                progress(j + 1, len(names), name)
        flush()
        if len(shards) == 1:
            (tmp / shards[0]).rename(tmp / "model.safetensors")
        else:
            total = sum((tmp / s).stat().st_size for s in shards)
            (tmp / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": index}, indent=2))
        for fname, data in aux_files.items():
            (tmp / fname).write_bytes(data)
        write_marker(tmp, MERGED_CHECKPOINT)
    return output


def info(delta_path) -> dict:
    """Method, ratio, true bytes, base fingerprint and per-matrix bit allocation of a delta file."""
    path = Path(delta_path)
    delta = load_delta(path)
    per_matrix = {}
    for name, m in delta.matrices.items():
        widths = m.rank_widths()
        counts = {}
        for w in widths:
            counts[w] = counts.get(w, 0) + 1
        per_matrix[name] = {"shape": list(m.shape), "bytes": m.nbytes(), "rank": m.rank,
                            "widths": {str(k): v for k, v in sorted(counts.items(), reverse=True)},
                            "ratio": 8 * m.nbytes() / (16 * m.shape[0] * m.shape[1])}
    params = delta.dense_delta_params()
    linear, header = delta.linear_bytes(), delta.linear_header_bytes()
    weights, whole_params = delta.weight_bytes(), delta.whole_delta_params()
    adapter_bytes = delta.params.get("lora_adapter_bytes")  # set when FINETUNED was a LoRA adapter
    return {"path": str(path), "method": delta.method, "ratio_requested": delta.ratio,
            "whole_mode": bool(delta.params.get("whole", False)),
            "ratio_whole": weights["total"] / (2 * whole_params) if whole_params else 0.0,
            "whole_params": whole_params, "weight_bytes": weights,
            "lora_adapter_bytes": adapter_bytes,
            "ratio_vs_adapter": linear / adapter_bytes if adapter_bytes else None,
            "ratio_achieved": 8 * linear / (16 * params) if params else 0.0,
            "linear_header_bytes": header,
            "ratio_on_disk": 8 * (linear + header) / (16 * params) if params else 0.0,
            "file_bytes": path.stat().st_size, "linear_bytes": linear,
            "other_bytes": delta.dense_bytes(), "aux_bytes": delta.aux_bytes(),
            "dense_delta_params": params, "base": delta.base_fingerprint, "matrices": per_matrix,
            "other_tensors": sorted(delta.dense) + sorted(delta.rows),
            "vocab": {n: {"shape": shape, "rows": int(idx.numel()), "rank": m.rank, "bytes": weights["vocab"][n]}
                      for n, (idx, m, shape) in delta.vocab.items()}}
