"""The sequential compressor: a fine-tune against its base into a delta file, one decoder layer at a time.

The data path, top to bottom (`run_compress`):

1. open BASE and FINETUNED (a checkpoint or a PEFT LoRA adapter) and check they fit together;
2. calibrated methods: tokenise the calibration windows and run them through the layers before layer 0
   (`DecoderStack.embed`) — the hidden states X entering layer 0, [nsamples, seqlen, d] float32;
3. for each layer i (skipped when a finished part of an interrupted run exists):
   a. capture H = XXᵀ of every linear of the layer run with the fine-tune's weights;
   b. ΔW = W_ft − W_base of every changed linear → `compress_matrix(ΔW, H, α)`; other changed tensors
      kept exactly; the layer written as a resume part;
   c. propagate X through base + ΔŴ (compressed) of layer i;
4. the tensors outside the layers (embeddings, final norm, lm_head) diffed exactly — in whole-delta mode
   (the default; not job.exact_embeddings) the changed rows of embedding / lm_head are compressed
   within what the linears left of the one budget (pipeline/whole_budget.py, planned before step 2; how
   the budget is shared between the parts: pipeline/budget_split.py, measured on pipeline/effect_probe.py's
   text);
5. BitDelta with distill_steps: its scales distilled against the fine-tune's logits;
6. the delta file written atomically; the resume parts removed.

Calibration activations (decision): layer i's Hessian H = XXᵀ is taken on the hidden states of the
*reconstructed* model — base + the compressed deltas of layers 0..i-1 — i.e. what the served model
will feed layer i (GPTQ's sequential order). Inside layer i the inputs of each linear come from the
layer run with the fine-tune's weights, so q/k/v/o and gate/up/down all see the same stream. The
pass embeds with the fine-tune's exact embedding rows: the vocabulary rows are compressed after it
(their head role needs the final states' H), so in whole-delta mode the served model's layer-0 input
differs from the pass's by the embedding rows' compression error.
tests/pipeline/test_compress_pipeline.py checks this against a direct computation on the merged model.

Progress is reported as events (pipeline/events.py) to the listeners given; nothing else observes the run.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace

import torch
from transformers import AutoTokenizer

from .. import __version__
from ..algorithms.budget import storage_ratio
from ..algorithms.compress_matrix import compress_matrix
from ..algorithms.compressed_linear import CompressedLinear
from ..algorithms.lowrank_svd import FactoredDelta
from ..calibration.data import clamp_seqlen, load_calibration
from ..calibration.decoder_stack import DecoderStack
from ..calibration.hessians import capture_hessians
from ..calibration.layer_inputs import LayerInputs, run_layer
from ..calibration.offload import HiddenFiles, offload_advice
from ..checkpoint.apply_delta import base_fingerprint, finetuned_tensor, split_aux_files
from ..checkpoint.compatibility import CompatibilityReport, check_compatible
from ..checkpoint.hub import resolve_model_dir
from ..checkpoint.lora_source import LoraFinetunedReader, is_lora_adapter
from ..checkpoint.reader import CheckpointReader
from ..errors import CheckpointError, DeltaRangeError, WholeBudgetWarning
from ..format.delta_file import DeltaFile, ratio_within_file, save_delta
from ..format.resume_part import MappedCompressedLinear, part_problem, read_layer_part, write_layer_part
from .bitdelta_distill import distill_bitdelta_scales
from .budget_split import EFFECT_SEQUENCES, measures_effects
from .config import CalibrationConfig, CompressJob
from .effect_probe import effect_probe
from .events import HessiansCaptured, LayerDone, LayerStarted, Listener, Phase, PhaseDone, PhaseStarted
from .tensor_diff import add_non_layer_tensors, changed_exact_tensor, linear_delta
from .whole_budget import compress_vocab_parts, plan_whole_budget

__all__ = ["CompressSummary", "MatrixCompressor", "run_compress"]

# (ΔW [h_out, h_in], H [h_in, h_in] or None, ratio, method, PrinMixConfig) → CompressedLinear
MatrixCompressor = Callable[..., CompressedLinear]


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
    split: dict | None = None  # whole mode: {"rule", "vocab_share", "proportional_share"} (budget_split.py)

    @property
    def ratio_whole(self) -> float:
        """All bytes stored for weights (with their header entries) / 16-bit size of what differs."""
        return self.weight_bytes["total"] / (2 * self.whole_params) if self.whole_params and self.weight_bytes \
            else 0.0

    @property
    def ratio_achieved(self) -> float:
        """Blob bytes / 16-bit size of the linear deltas (the paper's ratio, with every stored byte counted)."""
        return storage_ratio(self.linear_bytes, self.dense_params)

    @property
    def ratio_on_disk(self) -> float:
        """As ratio_achieved, with the linear deltas' header entries (names, offsets, checksums) counted too."""
        return storage_ratio(self.linear_bytes + self.linear_header_bytes, self.dense_params)


def run_compress(job: CompressJob, device: torch.device, resume: bool = True, listeners: Sequence[Listener] = (),
                 matrix_compressor: MatrixCompressor = compress_matrix) -> CompressSummary:
    """Run `job` on `device` (see the module docstring for the steps). Atomic; resumable when `resume`.

    matrix_compressor: what compresses each matrix (compress_matrix; benchmarks/bench_memory.py passes a
    cheap one to measure the pipeline alone at sizes where PrinMix itself takes hours per matrix).
    """
    t0 = time.time()

    def emit(event) -> None:
        for listener in listeners:
            listener(event)

    # 1. the pair (and calibration windows no longer than the model's context)
    base_r, ft_r, compat = open_pair(job.base, job.finetuned, job.base_revision, job.finetuned_revision)
    check_inputs_finite(base_r, ft_r)  # an Inf in model.norm is found now, not after every layer
    if job.calibrated or job.distill_steps:
        seqlen = clamp_seqlen(job.calibration.seqlen, ft_r.config)
        job = replace(job, calibration=replace(job.calibration, seqlen=seqlen))
    stack = DecoderStack(ft_r)
    fingerprint = base_fingerprint(base_r)
    # the resume key covers every byte of both models (content_hash(full=True)), not the sampled fingerprint:
    # a model edited only in unsampled bytes must not reuse stale parts (of either: the delta is relative to
    # the base). Cost (benchmarks/bench_resume_key.py, one core): 0.75 s per SmolLM2-135M model (269 MB bf16)
    # against 0.12 s sampled; ~6.5 min per 140 GB model (70B), a few % of its compression.
    params = job.run_params(base_r.content_hash(full=True), ft_r.content_hash(full=True))
    work = job.output.parent / f".{job.output.name}.partial-{_run_key(params)}"
    if not resume and work.exists():
        shutil.rmtree(work)
    calib = job.calibration
    ids = calibration_ids(ft_r, calib) if job.calibrated else None
    counts = None
    if ids is not None and not job.exact_embeddings:  # token counts: the embedding rows' lookup weights
        counts = torch.bincount(ids.flatten().cpu(), minlength=int(ft_r.config.get_text_config().vocab_size or 0))
    # the whole-delta budget: what differs and the ratio α' of every linear blob (BitDelta: fixed size)
    probe = None   # the measured split's text: calibration windows and the fine-tune's own samples
    if ids is not None and measures_effects(job.method, job.split) and not job.exact_embeddings:
        probe = effect_probe(ft_r, ids, EFFECT_SEQUENCES, calib.seed, device, calib.batch_size)
    plan = None if job.exact_embeddings else plan_whole_budget(stack, base_r, ft_r, compat, job.alpha, job.method,
                                                               job.config, counts, job.vocab_share, probe,
                                                               job.split)
    layer_alpha = job.alpha if plan is None or job.method == "bitdelta" else plan.linear_alpha

    # 2. the hidden states entering layer 0
    inputs, hidden_files = None, None
    if job.calibrated:
        hidden_shape = (*ids.shape, stack.config.get_text_config().hidden_size)
        if calib.offload:
            hidden_files = HiddenFiles(calib.offload, hidden_shape)
        elif device.type == "cpu":
            advice = offload_advice(hidden_shape)
            if advice:
                warnings.warn(advice, stacklevel=3)  # a UserWarning: shown by default
        emit(PhaseStarted(Phase.EMBED))
        inputs = stack.embed(ft_r, ids, device, calib.batch_size, out=hidden_files and hidden_files.next())
        emit(PhaseDone(Phase.EMBED))

    aux_files, aux_from_base = split_aux_files(base_r, ft_r)  # files identical to the base's are not stored
    delta = DeltaFile(job.method, job.alpha,
                      {"config": asdict(job.config) if job.method == "prinmix" else {},
                       "calib": calib.calib, "nsamples": calib.nsamples, "seqlen": calib.seqlen,
                       "seed": calib.seed, "prinmix_version": __version__,
                       "removed_tensors": compat.only_in_base, "aux_from_base": aux_from_base,
                       "whole": not job.exact_embeddings,
                       **getattr(ft_r, "delta_params", {})},
                      base_fingerprint=fingerprint, aux_files=aux_files)

    # 3. layer by layer
    n_layers = stack.num_layers
    for i in range(n_layers):
        emit(LayerStarted(i, n_layers))
        part_path = work / f"layer_{i:05d}.safetensors"
        problem = part_problem(part_path) if part_path.exists() else None
        if problem:  # damaged since it was written: compress this layer again
            warnings.warn(f"{part_path}: {problem}; compressing layer {i} again", stacklevel=3)
            part_path.unlink()
        resumed = part_path.exists()
        if not resumed:
            # 3a. Hessians of the layer's linears on the current hidden states
            hessians = {}
            if inputs is not None:
                emit(PhaseStarted(Phase.CAPTURE, i))
                hessians = layer_hessians(stack, i, ft_r, inputs, device, calib.batch_size)
                emit(PhaseDone(Phase.CAPTURE, i))
                emit(HessiansCaptured(i, dict(hessians)))  # a copy: entries are popped as matrices are done
            # 3b. compress the changed linears, keep the other changed tensors exactly
            matrices, dense = {}, {}
            prefix = stack.layer_prefix(i)
            linear_weights = {prefix + n + ".weight" for n in stack.linear_names(i)}
            for name in stack.layer_tensor_names(i):
                if name not in linear_weights or name not in base_r:
                    stored = changed_exact_tensor(name, base_r, ft_r)
                    if stored is not None:
                        dense[name] = stored
                    continue
                d = linear_delta(name, base_r, ft_r)
                H = hessians.pop(name, None)  # the last user of a shared H frees it
                if d is None:
                    continue
                # the matrix's header entries come off its budget (BitDelta's size is fixed: 1 bit per entry;
                # whole-delta mode: the headers are paid in the plan, layer_alpha is already the blob's ratio)
                ratio = layer_alpha if job.method == "bitdelta" or plan is not None \
                    else ratio_within_file(layer_alpha, name, d.shape)
                detail = {"matrix": name, "shape": list(d.shape)}
                emit(PhaseStarted(Phase.COMPRESS, i, detail))
                m = compress_checked(matrix_compressor, d, H, ratio, job, name, i, stack, ft_r, device)
                # kept as its blob until the part is written: no device tensors, unpacked codes or diagnostics
                objective = m.info.get("objective")
                matrices[name] = MappedCompressedLinear.from_blob(m.to_blob(), m.shape, m.method,
                                                                  {"objective": objective} if objective is not None
                                                                  else {})
                emit(PhaseDone(Phase.COMPRESS, i, detail))
                d = H = m = None
            hessians = None
            work.mkdir(parents=True, exist_ok=True)  # made only now: a run failing on its inputs leaves nothing
            write_layer_part(job.method, matrices, dense, part_path)
            matrices = dense = None
        part = read_layer_part(part_path)
        delta.matrices.update(part.matrices)  # bit-packed, memory-mapped from the part: not process RAM
        delta.dense.update(part.dense)
        # 3c. propagate through base + compressed delta of this layer
        if inputs is not None:
            emit(PhaseStarted(Phase.PROPAGATE, i))
            inputs = inputs.with_hidden(propagate(stack, i, base_r, part, inputs, device, calib.batch_size,
                                                  out=hidden_files.next() if hidden_files else None))
            emit(PhaseDone(Phase.PROPAGATE, i))
        part = None
        emit(LayerDone(i, n_layers, resumed))
    head_H = None
    if plan is not None and inputs is not None and any("head" in p.roles for p in plan.vocab if p.changed.numel()):
        # the reconstructed model's last-layer outputs, through the (exactly stored) final norm
        head_H = stack.head_hessian(ft_r, ids, inputs.hidden, device, calib.batch_size).cpu()
    inputs = None
    if hidden_files:
        hidden_files.close()

    # 4. outside the layers
    vocab_report = {}
    if plan is None:
        add_non_layer_tensors(delta, stack.non_layer_tensor_names, base_r, ft_r, compat)
    else:
        add_non_layer_tensors(delta, stack.non_layer_tensor_names, base_r, ft_r, compat,
                              skip={p.name for p in plan.vocab})
        vocab_report = compress_vocab_parts(delta, plan, base_r, ft_r, job.method, job.config, counts, head_H,
                                            device)
    # 5. BitDelta's scale distillation
    if job.method == "bitdelta" and job.distill_steps > 0:
        ids = calibration_ids(ft_r, calib)
        distill_bitdelta_scales(base_r, ft_r, delta, ids, steps=job.distill_steps, device=device, seed=calib.seed)
        delta.params["distill_steps"] = job.distill_steps
    # 6. the file
    delta.stats = {"layers": n_layers, "objective": {n: m.info.get("objective") for n, m in delta.matrices.items()
                                                     if m.info.get("objective") is not None}}
    if plan is not None:
        delta.stats["whole"] = {"linear_ratio": layer_alpha, "vocab": vocab_report}
        if plan.split is not None:
            entries = plan.linear_params + plan.vocab_params
            delta.stats["whole"]["split"] = {"rule": plan.split.rule, "vocab_share": plan.split.vocab_share,
                                             "proportional_share": plan.vocab_params / entries if entries else 0.0,
                                             **({"effects": plan.split.effects, "probe": probe.source}
                                                if plan.split.effects else {})}
    file_bytes = save_delta(delta, job.output)
    shutil.rmtree(work, ignore_errors=True)
    summary = CompressSummary(str(job.output), job.method, job.alpha, delta.linear_bytes(),
                              delta.dense_delta_params(), delta.dense_bytes(), delta.aux_bytes(), file_bytes,
                              time.time() - t0, n_layers, delta.linear_header_bytes(),
                              delta.params.get("lora_adapter_bytes"), delta.whole_delta_params(),
                              delta.weight_bytes(), job.exact_embeddings)
    if plan is not None and plan.split is not None and plan.vocab:
        summary.split = {k: v for k, v in delta.stats["whole"]["split"].items() if k != "effects"}
    if plan is not None and job.method != "bitdelta" and summary.ratio_whole > job.alpha:
        # whole_budget.py decision 5: the parts' fixed minimum sizes exceed their shares (toy models)
        warnings.warn(f"{job.output}: the whole delta is stored at {summary.ratio_whole:.5f}, above the requested "
                      f"{job.alpha:.5f}: the header entries of this model's toy-sized matrices are not charged to "
                      f"their budgets and fixed per-matrix fields exceed their share (pipeline/whole_budget.py, "
                      f"decisions 1 and 5)", WholeBudgetWarning, stacklevel=3)
    return summary


def compress_checked(matrix_compressor: MatrixCompressor, d, H, ratio: float, job: CompressJob, name: str, i: int,
                     stack: DecoderStack, ft_r, device: torch.device) -> CompressedLinear:
    """matrix_compressor(ΔW, H, ratio, method, config) on `device`, with a one-line DeltaRangeError (naming the
    fine-tune, the matrix and its largest entry) for a delta the method's float32 maths or float16 fields
    cannot hold (e.g. a 3e38 entry)."""
    try:
        m = matrix_compressor(d.to(device), None if H is None else H.to(device), ratio, job.method, job.config)
    except ValueError as e:  # e.g. a 3e38 entry: its SVD or the layer's activations overflow float32
        if H is not None and not bool(torch.isfinite(H).all()):
            peak = max(float(ft_r.get(n, torch.float32).abs().max()) for n in stack.layer_tensor_names(i))
            raise DeltaRangeError(f"{ft_r.path}: layer {i}'s calibration activations overflow float32 at "
                                  f"{name!r} (the fine-tune's weights in this layer reach {peak:.3g})") from None
        raise DeltaRangeError(f"{ft_r.path}: cannot compress the delta of {name!r} ({e}); its largest "
                              f"entry is {_max_abs(d):.3g}") from None
    bad = m.nonfinite_field()
    if bad is not None:
        raise DeltaRangeError(f"{ft_r.path}: the delta of {name!r} (largest entry {_max_abs(d):.3g}) does not "
                              f"fit {job.method}'s float16 fields ({bad} overflows)")
    return m


def _max_abs(d) -> float:
    return float(d.dense().abs().max() if isinstance(d, FactoredDelta) else d.abs().max())


def check_inputs_finite(*readers) -> None:
    """Read every tensor of each model once and raise CheckpointError (naming the file and tensor) for a
    NaN/Inf, before the long per-layer work. Costs one read of each model (benchmarks/bench_resume_key.py)."""
    for reader in readers:
        for name in reader.tensor_names:
            reader.get(name, dtype=None)  # check_finite: raises CheckpointError


def open_pair(base, finetuned, base_revision: str | None = None, finetuned_revision: str | None = None
              ) -> tuple[CheckpointReader, CheckpointReader | LoraFinetunedReader, CompatibilityReport]:
    """Readers of BASE and FINETUNED (a checkpoint, or a PEFT LoRA adapter over BASE), checked compatible.

    Either may be a Hugging Face Hub id (with a revision); a Hub id may name a LoRA adapter too."""
    base_r = CheckpointReader(base, base_revision)
    ft_dir = resolve_model_dir(finetuned, finetuned_revision).path
    ft_r = LoraFinetunedReader(base_r, ft_dir) if is_lora_adapter(ft_dir) else CheckpointReader(finetuned,
                                                                                                finetuned_revision)
    return base_r, ft_r, check_compatible(base_r, ft_r)


def calibration_ids(ft_r, calib: CalibrationConfig) -> torch.Tensor:
    """Token windows [nsamples, seqlen] of the calibration text, tokenised by the fine-tune's tokenizer."""
    try:
        tok = AutoTokenizer.from_pretrained(str(getattr(ft_r, "tokenizer_path", ft_r.path)))
    except Exception as e:  # noqa: BLE001 - transformers raises many types
        raise CheckpointError(f"{ft_r.path}: cannot load its tokenizer for calibration ({e})") from None
    return load_calibration(calib.calib, tok, calib.nsamples, calib.seqlen, calib.seed)


def layer_hessians(stack: DecoderStack, i: int, ft_r, inputs: LayerInputs, device: torch.device,
                   batch_size: int) -> dict[str, torch.Tensor]:
    """{weight name: H = XXᵀ float32 [h_in, h_in]} of layer i run with the fine-tune's weights on `inputs`
    (linears fed the same tensor share one H object)."""
    prefix = stack.layer_prefix(i)
    state = {n[len(prefix):]: ft_r.get(n, torch.float32) for n in stack.layer_tensor_names(i)}
    layer = stack.build_layer(i, state, device)
    stats = capture_hessians(layer, inputs, batch_size)
    return {prefix + n + ".weight": s.H for n, s in stats.items()}


def propagate(stack: DecoderStack, i: int, base_r: CheckpointReader, part, inputs: LayerInputs,
              device: torch.device, batch_size: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Outputs [n, seq, d] float32 of layer i with weights base + ΔŴ (the part's compressed linears,
    decoded here and freed after) and the part's exact tensors, over the calibration hidden states."""
    prefix = stack.layer_prefix(i)
    decoded = DeltaFile(part.method, 0.0, {})
    decoded.matrices = {n: m.decoded() for n, m in part.matrices.items()}
    decoded.dense = part.dense
    names = stack.layer_tensor_names(i)
    state = {n[len(prefix):]: finetuned_tensor(n, base_r, decoded, torch.float32) for n in names if n in base_r}
    state.update({n[len(prefix):]: part.dense[n].float() for n in names if n not in base_r})
    layer = stack.build_layer(i, state, device)
    return run_layer(layer, inputs, batch_size, out=out)


def _run_key(params: dict) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
