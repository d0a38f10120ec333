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

Step-level API for a continuous-batching server (token ids in, token ids out; greedy):

    state = model.prefill(prompts, tenants, seq_ids)   # one forward over the left-padded prompts
    state.next_tokens                                  # the first generated token of each sequence
    model.decode_step(state)                           # one token for every sequence, one forward
    state = DecodeState.join(state, model.prefill(...))  # new sequences join the running batch
    state.drop(seq_ids)                                # finished sequences leave

KV cache: one transformers DynamicCache for the running batch, [B, kv_heads, L, head_dim] per layer,
every sequence right-aligned (left padding) with a 0/1 attention mask [B, L] and explicit per-sequence
position ids. Joining left-pads the shorter state's keys/values with zeros (masked out); leaving
selects the remaining rows and trims columns that are padding for all of them. Sliding-window
layers are kept full-length (the mask applies the window), so every layer has the same length.
One step at a time (not thread-safe). The tenants of one running batch must fit the device budget
together; drop a tenant's sequences before remove_tenant (a later step would name an unknown tenant).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Hashable, Sequence

import torch
from torch import nn

from ..errors import PrinmixError
from ..format.delta_file import load_delta
from ..models.apply_delta import check_base
from ..models.checkpoint import CheckpointReader
from .delta_linear import BASE_SLOT, DeltaLinear, LinearDelta, TenantBatch, TenantContext, TenantRegistry
from .packed import PackedLinear
from .vocab_rows import VocabPayload


# ---- per-tenant payloads of non-linear modules --------------------------------------------------

def _vocab_payload(delta, name: str) -> VocabPayload:
    """The compressed (delta.vocab) and exact (delta.rows) rows of vocabulary matrix NAME, rows sorted."""
    empty = torch.zeros(0, dtype=torch.int64)
    index, packed = empty, None
    if name in delta.vocab:
        index, m, _ = delta.vocab[name]           # row sets are stored sorted
        packed = PackedLinear.from_compressed(m)
    exact_index, exact_values = empty, torch.zeros(0, 0)
    if name in delta.rows:
        idx, values, _ = delta.rows[name]
        order = torch.argsort(idx)
        exact_index, exact_values = idx[order].to(torch.int64), values[order]   # stored dtype; cast at use
    return VocabPayload(index.to(torch.int64), packed, exact_index, exact_values)


@dataclass
class TensorsPayload:
    """A tenant's replacement parameters of one module: {parameter name: tensor}."""

    tensors: dict[str, torch.Tensor]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def to(self, device) -> "TensorsPayload":
        return TensorsPayload({k: v.to(device) for k, v in self.tensors.items()})


class _TenantModule(nn.Module):
    """Common part: the wrapped module, the shared context and the resident payloads by slot."""

    def __init__(self, base: nn.Module, context: TenantContext):
        super().__init__()
        self.base = base
        self.context = context
        self.tenants: dict[int, object] = {}

    def load_tenant(self, slot: int, payload) -> None:
        self.tenants[slot] = payload

    def unload_tenant(self, slot: int) -> None:
        self.tenants.pop(slot, None)

    def resident_bytes(self, slot: int) -> int:
        p = self.tenants.get(slot)
        return 0 if p is None else p.nbytes()

    def _segments(self, n_rows: int, device):
        batch = self.context.batch
        if batch is None or not self.tenants:
            return []
        groups = batch.rows(n_rows, device)
        return [(self.tenants[s], groups.rows_of(a, n)) for s, a, n in groups.segments if s in self.tenants]


class PerTenantParams(_TenantModule):
    """A small module (a norm) with per-tenant parameters: each tenant's rows (leading dims flattened,
    last dim kept) are run through the module with that tenant's parameters (functional_call)."""

    def forward(self, x: torch.Tensor, *args, **kwargs):
        out = self.base(x, *args, **kwargs)
        segments = self._segments(x.numel() // x.shape[-1], x.device)
        if not segments:
            return out
        out = out.contiguous()
        rows_x, rows_out = x.reshape(-1, x.shape[-1]), out.view(-1, out.shape[-1])
        for payload, idx in segments:
            o = torch.func.functional_call(self.base, payload.tensors, (rows_x.index_select(0, idx),) + args,
                                           kwargs, strict=False)
            rows_out.index_copy_(0, idx, o.to(rows_out.dtype))
        return out


class PerTenantEmbedding(_TenantModule):
    """nn.Embedding whose rows some tenants change (VocabPayload.lookup per token of their sequences)."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.base(ids)
        segments = self._segments(ids.numel(), ids.device)
        if not segments:
            return out
        flat_ids, rows_out = ids.reshape(-1), out.view(-1, out.shape[-1])
        for p, idx in segments:
            rows = p.lookup(flat_ids.index_select(0, idx), rows_out.index_select(0, idx))
            rows_out.index_copy_(0, idx, rows.to(rows_out.dtype))
        return out


class PerTenantRows(_TenantModule):
    """An output nn.Linear (lm_head) whose weight rows some tenants change (VocabPayload.head)."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out = self.base(h)
        segments = self._segments(h.numel() // h.shape[-1], h.device)
        if not segments:
            return out
        rows_h, rows_out = h.reshape(-1, h.shape[-1]), out.view(-1, out.shape[-1])
        for p, idx in segments:
            o = p.head(rows_h.index_select(0, idx), rows_out.index_select(0, idx), self.base.bias)
            rows_out.index_copy_(0, idx, o.to(rows_out.dtype))
        return out


# ---- decode state --------------------------------------------------------------------------------

@dataclass
class SequenceState:
    seq_id: Hashable
    tenant: str | None
    prompt: list[int]
    generated: list[int] = field(default_factory=list)

    @property
    def next_position(self) -> int:
        """Position id of the last generated token, the one the next decode step feeds."""
        return len(self.prompt) + len(self.generated) - 1


@dataclass
class DecodeState:
    """The running batch: its sequences (row order of the cache), KV cache and 0/1 attention mask [B, L]."""

    seqs: list[SequenceState]
    cache: object
    mask: torch.Tensor

    @property
    def seq_ids(self) -> list[Hashable]:
        return [s.seq_id for s in self.seqs]

    @property
    def next_tokens(self) -> list[int]:
        """The token each sequence produced in the last step."""
        return [s.generated[-1] for s in self.seqs]

    def __len__(self) -> int:
        return len(self.seqs)

    @staticmethod
    def join(a: "DecodeState", b: "DecodeState") -> "DecodeState":
        """One batch holding a's then b's sequences (caches left-padded to the longer one)."""
        if set(a.seq_ids) & set(b.seq_ids):
            raise PrinmixError("cannot join decode states that share sequence ids")
        if not a.seqs:
            return b
        if not b.seqs:
            return a
        length = max(a.mask.shape[1], b.mask.shape[1])
        layers = []
        for (ka, va), (kb, vb) in zip(_cache_tensors(a.cache), _cache_tensors(b.cache)):
            layers.append((torch.cat([_left_pad(ka, length), _left_pad(kb, length)]),
                           torch.cat([_left_pad(va, length), _left_pad(vb, length)])))
        mask = torch.cat([_left_pad(a.mask, length, dim=1), _left_pad(b.mask, length, dim=1)])
        return DecodeState(a.seqs + b.seqs, _make_cache(layers), mask)

    def drop(self, seq_ids) -> None:
        """Remove these sequences from the batch (in place); trims all-padding cache columns."""
        gone = set(seq_ids)
        keep = [i for i, s in enumerate(self.seqs) if s.seq_id not in gone]
        if len(keep) == len(self.seqs):
            return
        self.seqs = [self.seqs[i] for i in keep]
        idx = torch.tensor(keep, dtype=torch.long, device=self.mask.device)
        mask = self.mask.index_select(0, idx)
        used = mask.any(0).nonzero()
        first = int(used[0]) if used.numel() else mask.shape[1]
        self.mask = mask[:, first:]
        self.cache = _make_cache([(k.index_select(0, idx)[:, :, first:], v.index_select(0, idx)[:, :, first:])
                                  for k, v in _cache_tensors(self.cache)])


def _left_pad(t: torch.Tensor, length: int, dim: int = 2) -> torch.Tensor:
    extra = length - t.shape[dim]
    if extra == 0:
        return t
    shape = list(t.shape)
    shape[dim] = extra
    return torch.cat([torch.zeros(shape, dtype=t.dtype, device=t.device), t], dim=dim)


def _cache_tensors(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))                    # transformers < 4.56


def _make_cache(layers):
    from transformers import DynamicCache

    cache = DynamicCache()
    for i, (k, v) in enumerate(layers):
        cache.update(k, v, i)
    return cache


# ---- the model -------------------------------------------------------------------------------------

class MultiTenantModel:
    """A base causal LM plus registered delta tenants, run together in one batch.

    device: where the base and resident tenants live; dtype: None = the checkpoint's; budget_bytes:
    device bytes for resident tenant payloads (None = all resident); backend: DeltaLinear's.
    """

    def __init__(self, base_dir, device="cpu", dtype: torch.dtype | None = None, budget_bytes: int | None = None,
                 backend: str = "auto"):
        from transformers import AutoModelForCausalLM

        self.base_dir = Path(base_dir)
        self.reader = CheckpointReader(base_dir)
        self.device = torch.device(device)
        self.model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=dtype or "auto").to(self.device)
        self.model.eval()
        self.backend = backend
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
                     if isinstance(p, LinearDelta) and p.packed is not None)
        info = {"delta": str(delta_path), "method": delta.method, "linear_bytes": linear,
                "other_bytes": self.registry.nbytes(name) - linear, "file_linear_bytes": delta.linear_bytes()}
        self.tenant_info[name] = info
        return info

    def tenant_bytes(self, name: str) -> dict:
        """{linear_bytes, other_bytes, file_linear_bytes} as registered, plus resident_bytes now on the device
        (0 while swapped out to host memory)."""
        return {**self.tenant_info[name], "resident_bytes": self.registry.resident_bytes(name)}

    def remove_tenant(self, name: str) -> None:
        self.registry.unregister(name)
        self.tenant_info.pop(name, None)

    def _plan(self, delta, delta_path) -> dict[str, tuple[str, object]]:
        """{module path: (wrapper kind, payload)} for every module the delta changes; refuses what the
        runtime cannot serve. Modules are looked at through their wrappers (the base module)."""
        if delta.params.get("removed_tensors"):
            raise PrinmixError(f"{delta_path}: the fine-tune removes tensors of the base; serve its merged model")
        plan: dict[str, tuple[str, object]] = {}

        def linear_delta(path) -> LinearDelta:
            kind, payload = plan.setdefault(path, ("linear", LinearDelta()))
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
            wrapper = DeltaLinear(module, self.context, self.backend)
        else:
            wrapper = {"params": PerTenantParams, "embedding": PerTenantEmbedding, "rows": PerTenantRows}[kind](
                module, self.context)
        parent_path, _, child = path.rpartition(".")
        setattr(self.model.get_submodule(parent_path) if parent_path else self.model, child, wrapper)
        self.modules[path] = wrapper

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
                seq_ids: Sequence[Hashable] | None = None) -> DecodeState:
        """Run the prompts (token ids) in one left-padded forward; the state holds each one's first token."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise PrinmixError("prefill needs at least one non-empty prompt")
        seq_ids = list(range(len(prompts))) if seq_ids is None else list(seq_ids)
        length = max(len(p) for p in prompts)
        ids = torch.zeros(len(prompts), length, dtype=torch.long)
        mask = torch.zeros(len(prompts), length, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, length - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
            mask[i, length - len(p):] = 1
        mask = mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = _make_cache([])
        logits = self.forward(ids, tenants, attention_mask=mask, position_ids=positions, cache=cache, last_only=True)
        first = logits[:, -1].argmax(-1).tolist()
        seqs = [SequenceState(sid, t, list(p), [tok]) for sid, t, p, tok in zip(seq_ids, tenants, prompts, first)]
        return DecodeState(seqs, cache, mask)

    def decode_step(self, state: DecodeState) -> list[int]:
        """Feed every sequence's last token (one forward for the batch); append and return the next ones."""
        if not state.seqs:
            return []
        ids = torch.tensor([[s.generated[-1]] for s in state.seqs], dtype=torch.long)
        positions = torch.tensor([[s.next_position] for s in state.seqs], dtype=torch.long, device=self.device)
        state.mask = torch.cat([state.mask, torch.ones(len(state), 1, dtype=state.mask.dtype,
                                                        device=state.mask.device)], 1)
        logits = self.forward(ids, [s.tenant for s in state.seqs], attention_mask=state.mask,
                              position_ids=positions, cache=state.cache, last_only=True)
        nxt = logits[:, -1].argmax(-1).tolist()
        for s, tok in zip(state.seqs, nxt):
            s.generated.append(tok)
        return nxt

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
