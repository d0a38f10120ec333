"""Many delta tenants on one base model, batched together: one forward pass per step for all.

`MultiTenantModel(base_dir)` loads a Hugging Face causal LM once. `add_tenant(name, delta_path)`
checks the delta was made for this base, and makes every module the delta touches tenant-aware:

    compressed linear deltas (linear/…)     DeltaLinear: packed factors, shrink/expand per tenant's rows
    changed linear biases (dense/….bias)    DeltaLinear: per-tenant bias delta (float32 [h_out])
    other small changed tensors (dense/…)   PerTenantParams: e.g. RMSNorm/LayerNorm weights; the module
                                            is re-run with the tenant's parameters on that tenant's rows
    changed embedding / lm_head rows        PerTenantEmbedding / PerTenantRows: only the changed rows are
    (vocab/… compressed, rows/… exact)      kept, compressed rows in their packed form (vocab_rows.py: a
                                            lookup gathers the batch's token rows, the head adds h ΔŴ_Rᵀ);
                                            a tied lm_head follows the tenant's embedding rows
Refused with a one-line PrinmixError (serve `prinmix merge`'s output instead): a dense replacement of
a whole linear or embedding weight, a changed vocabulary size, tensors removed or added relative to
the base, a bias the base lacks, and modules the runtime cannot wrap (non-nn.Linear / nn.Embedding).
Every tenant payload is swapped between host and device as a whole by the TenantRegistry.

Step-level API for a continuous-batching server (token ids in, token ids out):

    state = model.prefill(prompts, tenants, seq_ids)   # one forward over the left-padded prompts
    state.next_tokens                                  # the first generated token of each sequence
    model.decode_step(state)                           # one token for every sequence, one forward
    state = DecodeState.join(state, model.prefill(...))  # new sequences join the running batch
    state.drop(seq_ids)                                # finished sequences leave

Both steps take `choose`, the token-choice hook (a TokenChooser: the step's sequences and their
next-token logits [B, vocab] in, one token id per sequence out); the default is greedy (argmax). A
server samples per request through it (serve/scheduler.py) and runs exactly these steps.

The running batch (sequences, KV cache, mask; join / drop) is runtime/decode_state.py's DecodeState;
the per-tenant norm / embedding-row / lm_head-row wrappers are runtime/tenant_modules.py's; the
compressed linears are DeltaLinear (runtime/delta_linear.py), which on CPU multiplies straight from the packed
codes in the C++ kernel (runtime/packed_kernel.py; where it does not build, the hottest tenants' dequantised
factors kept in a shared FactorCache, runtime/factor_cache.py). Sliding-window
layers are kept full-length (the mask applies the window), so every layer has the same length.
One step at a time (not thread-safe). The tenants of one running batch must fit the device budget
together; drop a tenant's sequences before remove_tenant (a later step would name an unknown tenant).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Callable, Hashable, Sequence

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from ..checkpoint.apply_delta import check_base
from ..checkpoint.reader import CheckpointReader
from ..errors import PrinmixError
from ..format.delta_file import load_delta
from .decode_state import DecodeState, SequenceState, left_padded, make_cache
from .delta_linear import (
    BASE_SLOT,
    DeltaLinear,
    TenantBatch,
    TenantContext,
    TenantDelta,
    TenantRegistry,
    runs_packed_kernel,
    triton_available,
)
from .factor_cache import FactorCache
from .packed import PackedLinear
from .tenant_modules import PerTenantEmbedding, PerTenantParams, PerTenantRows, RowsPayload, TensorsPayload
from .vocab_rows import VocabPayload

__all__ = ["DEFAULT_FACTOR_CACHE_BYTES", "DecodeState", "MultiTenantModel", "SequenceState", "TokenChooser",
           "default_factor_cache_dtype", "greedy"]

TokenChooser = Callable[[list[SequenceState], torch.Tensor], list[int]]
"""The token-choice hook of prefill / decode_step: (the step's sequences, their next-token logits
[B, vocab] in the same row order) → the next token id of each. Called once per step, before the
tokens are appended (a sequence's `generated` holds the tokens before this one)."""


def greedy(seqs: list[SequenceState], logits: torch.Tensor) -> list[int]:
    """The default TokenChooser: the most likely token of each row."""
    return logits.argmax(-1).tolist()

# Unpacked factors of the hottest (tenant, linear) pairs on CPU (runtime/factor_cache.py). In int8:
# r·(h_in + h_out) bytes a linear, 2–3.5× a tenant's packed bytes at mean widths of 3.6–2.5 bits (float32:
# 4× that); int4 about two thirds of int8 at PrinMix's widths. SmolLM2-135M at whole-delta 1/16 (16 MiB
# file, mostly 2-bit ranks): 33.8 MiB a tenant in int4, 51.5 MiB in int8 (linears and the compressed
# vocabulary rows), so 1 GiB holds 30 tenants in int4.
# By default int4 for a 16-bit model on CPU (int8 off CPU: the int4 kernel is torch's CPU one; bfloat16
# rounding of the delta product is below the model's own), float32 for a float32 model (which then
# matches its merged checkpoint's logits within ~1e-5, not ~1e-2).
DEFAULT_FACTOR_CACHE_BYTES = 1 << 30


def default_factor_cache_dtype(model_dtype: torch.dtype, device="cpu") -> torch.dtype:
    """torch.int4 for a bfloat16 / float16 model on CPU (torch.int8 on another device), torch.float32 otherwise."""
    if model_dtype not in (torch.bfloat16, torch.float16):
        return torch.float32
    return torch.int4 if torch.device(device).type == "cpu" else torch.int8


def _vocab_payload(delta, name: str) -> VocabPayload | RowsPayload:
    """The compressed (delta.vocab) and exact (delta.rows) rows of vocabulary matrix NAME, rows sorted.
    Exact rows only (--exact-embeddings, or nothing compressed): a RowsPayload, which skips the logit
    scatter when every row changed (tenant_modules.RowsPayload.head)."""
    empty = torch.zeros(0, dtype=torch.int64)
    exact_index, exact_values = empty, torch.zeros(0, 0)
    if name in delta.rows:
        idx, values, _ = delta.rows[name]
        order = torch.argsort(idx)
        exact_index, exact_values = idx[order].to(torch.int64), values[order]   # stored dtype; cast at use
    if name not in delta.vocab:
        return RowsPayload(exact_index, exact_values)
    index, m, _ = delta.vocab[name]           # row sets are stored sorted
    return VocabPayload(index.to(torch.int64), PackedLinear.from_compressed(m), exact_index, exact_values)


# ---- the model -------------------------------------------------------------------------------------

class MultiTenantModel:
    """A base causal LM plus registered delta tenants, run together in one batch.

    device: where the base and resident tenants live; dtype: None = the checkpoint's; budget_bytes:
    device bytes for resident tenant payloads (None = all resident); backend: DeltaLinear's;
    factor_cache_bytes: byte budget of the unpacked factors of the hottest tenants (the "cached"
    backend, which "auto" picks off CUDA when the packed kernel does not build; 0 = none: every step
    dequantises), in factor_cache_dtype
    (torch.int4 / torch.int8: the exact integer codes in torch's weight-only int4 / int8 GEMMs, bfloat16
    activations; torch.float32 / bfloat16: dequantised factors; None: default_factor_cache_dtype).

    Public surface beyond the step API: add_tenant / remove_tenant / tenants / tenant_bytes,
    memory() (bytes by kind), registry (TenantRegistry: residency, swaps) and factor_cache (hits,
    misses, used_bytes). A tenant's delta of any nn.Linear — lm_head included — is a TenantDelta
    served by a DeltaLinear under the module's name.
    """

    def __init__(self, base_dir, device="cpu", dtype: torch.dtype | None = None, budget_bytes: int | None = None,
                 backend: str = "auto", factor_cache_bytes: int = DEFAULT_FACTOR_CACHE_BYTES,
                 factor_cache_dtype: torch.dtype | None = None):
        self.base_dir = Path(base_dir)
        self.reader = CheckpointReader(base_dir)
        self.device = torch.device(device)
        self.model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=dtype or "auto").to(self.device)
        self.model.eval()
        self.backend = backend
        if factor_cache_dtype is None:
            factor_cache_dtype = default_factor_cache_dtype(next(self.model.parameters()).dtype, self.device)
        self.factor_cache = FactorCache(factor_cache_bytes, factor_cache_dtype) if factor_cache_bytes else None
        self.context = TenantContext()
        self.modules: dict[str, nn.Module] = {}
        self.registry = TenantRegistry(self.modules, self.device, budget_bytes)
        self.tenant_info: dict[str, dict] = {}
        params = inspect.signature(self.model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self._logits_to_keep = "logits_to_keep" in params
        inp, out = self.model.get_input_embeddings(), self.model.get_output_embeddings()
        names = {id(m): n for n, m in self.model.named_modules(remove_duplicate=False)}
        self._tied = (names.get(id(inp)), names.get(id(out))) \
            if out is not None and getattr(inp, "weight", None) is getattr(out, "weight", 0) else None

    # ---- tenants ---------------------------------------------------------------------------------
    @property
    def tenants(self) -> list[str]:
        return self.registry.names

    def add_tenant(self, name: str, delta_path) -> dict:
        """Register the delta file at `delta_path` as tenant `name`; returns its byte report
        (linear: packed factors, other: norms/biases/rows; the device holds both when resident)."""
        if name in self.registry:
            raise PrinmixError(f"tenant {name!r} is already registered")
        delta = load_delta(delta_path)
        check_base(self.reader, delta, delta_path)
        plan = self._plan(delta, delta_path)
        for path, (kind, payload) in plan.items():
            self._wrap(path, kind)
        payloads = {path: payload for path, (_, payload) in plan.items()}
        self.registry.register(name, payloads)
        linear = sum(p.packed.resident_bytes for p in payloads.values()
                     if isinstance(p, TenantDelta) and p.packed is not None)
        info = {"delta": str(delta_path), "method": delta.method, "linear_bytes": linear,
                "other_bytes": self.registry.nbytes(name) - linear, "file_linear_bytes": delta.linear_bytes()}
        self.tenant_info[name] = info
        return info

    def tenant_bytes(self, name: str) -> dict:
        """{linear_bytes, other_bytes, file_linear_bytes} as registered, plus resident_bytes now on the device
        (0 while swapped out to host memory)."""
        return {**self.tenant_info[name], "resident_bytes": self.registry.resident_bytes(name)}

    def memory(self) -> dict[str, int]:
        """Bytes on the device by kind: base weights, resident tenant payloads (packed deltas, norms,
        rows) and the factor cache's dequantised factors (KV caches are the DecodeState's: kv_bytes())."""
        base = sum(t.numel() * t.element_size() for t in self.model.parameters())
        deltas = sum(self.registry.resident_bytes(n) for n in self.registry.names)
        return {"base_bytes": base, "delta_bytes": deltas,
                "factor_cache_bytes": self.factor_cache.used_bytes if self.factor_cache is not None else 0}

    def remove_tenant(self, name: str) -> None:
        self.registry.unregister(name)
        self.tenant_info.pop(name, None)

    def _plan(self, delta, delta_path) -> dict[str, tuple[str, object]]:
        """{module path: (wrapper kind, payload)} for every module the delta changes; refuses what the
        runtime cannot serve. Modules are looked at through their wrappers (the base module)."""
        if delta.params.get("removed_tensors"):
            raise PrinmixError(f"{delta_path}: the fine-tune removes tensors of the base; serve its merged model")
        plan: dict[str, tuple[str, object]] = {}

        def linear_delta(path) -> TenantDelta:
            kind, payload = plan.setdefault(path, ("linear", TenantDelta()))
            if kind != "linear":
                raise PrinmixError(f"{delta_path}: {path} changes in two incompatible ways")
            return payload

        for wname, m in delta.matrices.items():
            path, module = self._module_of(wname, "weight", delta_path)
            if not isinstance(module, nn.Linear):
                raise PrinmixError(f"{delta_path}: {path} is a {type(module).__name__}, not an nn.Linear")
            linear_delta(path).packed = PackedLinear.from_compressed(m)
        for tname, t in delta.dense.items():
            pname = tname.rsplit(".", 1)[-1]
            path, module = self._module_of(tname, pname, delta_path)
            base_t = getattr(module, pname)
            if base_t is None:
                raise PrinmixError(f"{delta_path}: the fine-tune adds {tname}, which the base lacks; "
                                   f"serve its merged model")
            if isinstance(module, nn.Linear) and pname == "bias":
                linear_delta(path).bias = (t.float() - base_t.float()).to(self.device)
            elif isinstance(module, (nn.Linear, nn.Embedding)) or t.numel() > 1 << 20:
                raise PrinmixError(f"{delta_path}: {tname} is stored as a dense replacement "
                                   f"({t.numel()} values); the multi-tenant runtime serves only compressed "
                                   f"linears, biases, norms and changed rows")
            else:
                if tuple(t.shape) != tuple(base_t.shape):
                    raise PrinmixError(f"{delta_path}: {tname} is {list(t.shape)}, the base's is {list(base_t.shape)}")
                kind, payload = plan.setdefault(path, ("params", TensorsPayload({})))
                payload.tensors[pname] = t.to(base_t.dtype)
        tied = self._tied
        for rname in sorted(set(delta.rows) | set(delta.vocab)):
            path, module = self._module_of(rname, "weight", delta_path)
            kind = "embedding" if type(module) is nn.Embedding else "rows" if type(module) is nn.Linear else None
            if kind is None:
                raise PrinmixError(f"{delta_path}: rows of {rname} change, but {path} is a {type(module).__name__}")
            shape = (delta.rows.get(rname) or delta.vocab[rname])[2]
            if shape[0] != module.weight.shape[0]:
                raise PrinmixError(f"{delta_path}: the fine-tune changes the vocabulary size of {rname} "
                                   f"({module.weight.shape[0]} -> {shape[0]}); serve its merged model")
            payload = _vocab_payload(delta, rname)
            plan[path] = (kind, payload)
            if kind == "embedding" and tied and tied[0] == path and f"{tied[1]}.weight" not in delta.rows \
                    and f"{tied[1]}.weight" not in delta.vocab:
                plan[tied[1]] = ("rows", payload)        # a tied lm_head follows the embedding
        return plan

    def _module_of(self, tensor_name: str, param: str, delta_path) -> tuple[str, nn.Module]:
        if not tensor_name.endswith("." + param):
            raise PrinmixError(f"{delta_path}: cannot map tensor {tensor_name!r} to a module")
        path = tensor_name[: -len(param) - 1]
        try:
            module = self.model.get_submodule(path)
        except AttributeError:
            raise PrinmixError(f"{delta_path}: the model has no module {path!r} (tensor {tensor_name})") from None
        if path in self.modules:
            module = self.modules[path].base
        if not hasattr(module, param):
            raise PrinmixError(f"{delta_path}: module {path!r} has no parameter {param!r}")
        return path, module

    def _wrap(self, path: str, kind: str) -> None:
        if path in self.modules:
            existing = self.modules[path]
            want = {"linear": DeltaLinear, "params": PerTenantParams, "embedding": PerTenantEmbedding,
                    "rows": PerTenantRows}[kind]
            if not isinstance(existing, want):
                raise PrinmixError(f"{path}: already served as {type(existing).__name__}, cannot also be {kind}")
            return
        module = self.model.get_submodule(path)
        if kind == "linear":
            wrapper = DeltaLinear(module, self.context, self.backend, self.factor_cache)
        elif kind in ("rows", "embedding"):
            wrapper = (PerTenantRows if kind == "rows" else PerTenantEmbedding)(
                module, self.context, self._rows_factor_cache(), kernel=self._rows_kernel())
        else:
            wrapper = PerTenantParams(module, self.context)
        parent_path, _, child = path.rpartition(".")
        setattr(self.model.get_submodule(parent_path) if parent_path else self.model, child, wrapper)
        self.modules[path] = wrapper

    def _rows_kernel(self) -> bool:
        """Whether compressed lm_head rows are multiplied by the packed C++ kernel: where DeltaLinear's backend
        resolves to "packed" (explicitly, or "auto" on CPU with the kernel built)."""
        return runs_packed_kernel(self.backend, self.device)

    def _rows_factor_cache(self) -> FactorCache | None:
        """The factor cache for compressed embedding / lm_head rows: where DeltaLinear's backend is "cached" (so the
        "torch" reference stays the reference; Triton's CUDA path has no rows kernel and keeps the packed form;
        the packed kernel reads the codes)."""
        if self._rows_kernel():
            return None
        if self.backend == "cached" or (self.backend == "auto" and not (self.device.type == "cuda"
                                                                         and triton_available())):
            return self.factor_cache
        return None

    # ---- running -----------------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, tenants: Sequence[str | None], attention_mask=None,
                position_ids=None, cache=None, last_only: bool = False) -> torch.Tensor:
        """Logits [B, S, vocab] ([B, 1, vocab] with last_only) of a batch whose sequence i runs with
        tenant tenants[i] (None = base). attention_mask [B, cached + S] 0/1; position_ids [B, S]."""
        if len(tenants) != input_ids.shape[0]:
            raise PrinmixError(f"{input_ids.shape[0]} sequences but {len(tenants)} tenant names")
        slots = self.registry.acquire(tenants)
        self.context.batch = TenantBatch([BASE_SLOT if t is None else slots[t] for t in tenants])
        try:
            kwargs = {"attention_mask": attention_mask, "position_ids": position_ids}
            if last_only and self._logits_to_keep:
                kwargs["logits_to_keep"] = 1
            if cache is not None:
                kwargs.update({self._cache_kwarg: cache, "use_cache": True})
            else:
                kwargs["use_cache"] = False
            return self.model(input_ids=input_ids.to(self.device), **kwargs).logits
        finally:
            self.context.batch = None

    logits = forward

    def prefill(self, prompts: Sequence[Sequence[int]], tenants: Sequence[str | None],
                seq_ids: Sequence[Hashable] | None = None, choose: TokenChooser = greedy) -> DecodeState:
        """Run the prompts (token ids) in one left-padded forward; the state holds each one's first token,
        picked by `choose` from the logits of the prompt's last position."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise PrinmixError("prefill needs at least one non-empty prompt")
        seq_ids = list(range(len(prompts))) if seq_ids is None else list(seq_ids)
        ids, mask, positions = left_padded(prompts)
        mask, positions = mask.to(self.device), positions.to(self.device)
        cache = make_cache([])
        logits = self.forward(ids, tenants, attention_mask=mask, position_ids=positions, cache=cache, last_only=True)
        state = DecodeState([SequenceState(sid, t, list(p)) for sid, t, p in zip(seq_ids, tenants, prompts)],
                            cache, mask)
        self._append(state, choose, logits[:, -1])
        return state

    def decode_step(self, state: DecodeState, choose: TokenChooser = greedy) -> list[int]:
        """Feed every sequence's last token (one forward for the batch); append and return the next ones
        (picked by `choose`)."""
        if not state.seqs:
            return []
        ids = torch.tensor([[s.generated[-1]] for s in state.seqs], dtype=torch.long)
        positions = torch.tensor([[s.next_position] for s in state.seqs], dtype=torch.long, device=self.device)
        state.mask = torch.cat([state.mask, torch.ones(len(state), 1, dtype=state.mask.dtype,
                                                        device=state.mask.device)], 1)
        logits = self.forward(ids, [s.tenant for s in state.seqs], attention_mask=state.mask,
                              position_ids=positions, cache=state.cache, last_only=True)
        return self._append(state, choose, logits[:, -1])

    @staticmethod
    def _append(state: DecodeState, choose: TokenChooser, logits: torch.Tensor) -> list[int]:
        tokens = list(choose(state.seqs, logits))
        if len(tokens) != len(state.seqs):
            raise PrinmixError(f"the token chooser returned {len(tokens)} tokens for {len(state.seqs)} sequences")
        for s, tok in zip(state.seqs, tokens):
            s.generated.append(int(tok))
        return tokens

    def generate(self, prompts: Sequence[Sequence[int]], tenants: Sequence[str | None], max_new_tokens: int,
                 eos_token_id: int | None = None) -> list[list[int]]:
        """Greedy continuations (token ids, ≤ max_new_tokens each, ending at eos when produced)."""
        if max_new_tokens < 1:
            raise PrinmixError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        state = self.prefill(prompts, tenants)
        out = {s.seq_id: s for s in state.seqs}
        for _ in range(max_new_tokens - 1):
            state.drop([s.seq_id for s in state.seqs if eos_token_id is not None and s.generated[-1] == eos_token_id])
            if not state.seqs:
                break
            self.decode_step(state)
        return [out[i].generated for i in range(len(prompts))]
