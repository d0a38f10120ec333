"""A PEFT LoRA adapter on top of its base, read as if it were a merged fine-tune checkpoint.

`LoraFinetunedReader(base, adapter_dir)` offers CheckpointReader's interface (path, config,
config_dict, model_type, tensor_names, shape, dtype, get, aux_files, content_hash,
tied_embeddings, `in`), so the compress pipeline runs on an adapter unchanged. For a LoRA target
module with weight W [out, in]:

    get(W) = W + ΔW,   ΔW = s · B·A   (B = lora_B [out, r], A = lora_A [r, in]; transposed with
                                        fan_in_fan_out, i.e. for weights stored [in, out])
    s = α / r,  or α / √r with use_rslora;  r, α per module from rank_pattern / alpha_pattern
        (PEFT's rule: the first pattern key K with re.match("(.*\\.)?(K)$", module path) wins).

LoRA'd embeddings (lora_embedding_A [r, V], lora_embedding_B [d, r]) give ΔE = s·(B·A)ᵀ; a lora_B
bias (lora_bias=True) adds s·b to the module's bias. Tensors the adapter stores whole
(modules_to_save, an embedding saved as `…base_layer.weight`) replace the base's. Everything else
is the base's tensor. The weights of LoRA'd linears are served in float32 (the merged sum in bf16
would round most of ΔW away); other changed tensors in the base's dtype, as PEFT's merge gives.

`lora_factors(name)` returns (s·B, A) (fan_in_fan_out: (s·Aᵀ, Bᵀ)) so ΔW need not be formed.
DoRA, trainable-token adapters, layer replication and LoRA on 3-D expert parameters
(target_parameters) are refused with a CheckpointError.

What comes from peft (when installed, as with `pip install prinmix[test]` or any PEFT user): the adapter
config is parsed by `LoraConfig.from_pretrained` (its defaults and field handling, not ours) and the
rank/alpha pattern rule is peft's `get_pattern_key`. Without peft the same JSON fields are read directly.
Why a reader remains: peft computes a LoRA'd weight only inside a model built on the loaded base
(`PeftModel.from_pretrained(base_model, …).merge_and_unload()` needs the whole base in memory, in
module form). Compressing streams one tensor at a time from the checkpoint, so this module maps the
adapter's keys to the base checkpoint's tensor names, checks shapes against its header and serves
s·B·A (or the factors) per tensor: the part peft has no base-free API for.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open

from prinmix.checkpoint.layout import meta_causal_lm, revert_names
from prinmix.checkpoint.reader import AUX_SUFFIXES, CheckpointReader, read_safetensors_header
from prinmix.errors import CheckpointError
from prinmix.format.file_names import aux_name_problem

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
TOKENIZER_FILE_PREFIXES = ("tokenizer", "special_tokens_map", "vocab", "merges", "added_tokens", "chat_template")
# Config switches that change what the adapter computes beyond W + s·B·A: refused.
UNSUPPORTED_FLAGS = ("use_dora", "layer_replication", "trainable_token_indices", "target_parameters",
                     "use_qalora", "alora_invocation_tokens", "use_bdlora")
HASH_FULL_BYTES = 64 * 1024 * 1024
HASH_CHUNKS, HASH_CHUNK_BYTES = 1024, 4096


def is_lora_adapter(path) -> bool:
    """True when `path` is a directory holding a PEFT adapter (adapter_config.json)."""
    return (Path(path).expanduser() / ADAPTER_CONFIG).is_file()


def _peft():
    """(LoraConfig, get_pattern_key) from peft, or None when peft is not installed. Imported on first use:
    peft (optional; the test extra) takes seconds to import, which every command would otherwise pay."""
    try:
        from peft import LoraConfig
        from peft.utils.other import get_pattern_key
    except ImportError:  # pragma: no cover - peft is in the test extra
        return None
    return LoraConfig, get_pattern_key


def _pattern_value(patterns: dict, key: str, default):
    """PEFT's rule: the first pattern P (dict order) with re.match(rf"(.*\\.)?({P})$", key) gives the value."""
    if not patterns:
        return default
    peft = _peft()
    if peft is not None:
        return patterns.get(peft[1](list(patterns), key), default)
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


class _LoraModule:
    """The LoRA tensors of one target module (adapter keys) and its scale."""

    def __init__(self, path: str) -> None:
        self.path = path            # module path in the model, e.g. "model.layers.0.self_attn.q_proj"
        self.a = self.b = self.bias = None
        self.embedding = False
        self.scale = 0.0


class LoraFinetunedReader:
    """base + LoRA adapter, as a CheckpointReader (see the module docstring)."""

    def __init__(self, base: CheckpointReader, adapter_dir) -> None:
        self.base = base
        self._path = Path(adapter_dir).expanduser()
        self._config_file = self._path / ADAPTER_CONFIG
        self._weights = self._path / ADAPTER_WEIGHTS
        self.adapter_config = self._read_config()  # the raw JSON (hashed as is)
        self._settings = self._lora_settings()
        if not self._weights.is_file():
            bin_file = self._path / "adapter_model.bin"
            hint = " (only adapter_model.bin: re-save it with safe_serialization=True)" if bin_file.exists() else ""
            raise CheckpointError(f"{self._path}: no {ADAPTER_WEIGHTS}{hint}")
        self._entries = read_safetensors_header(self._weights)
        self._handle = None
        self._module_names: dict[str, str] | None = None
        self._modules: dict[str, _LoraModule] = {}        # checkpoint tensor name -> LoRA of it
        self._replaced: dict[str, str] = {}                # checkpoint tensor name -> adapter key
        self._classify_keys()
        self._names = sorted(set(base.tensor_names) | set(self._replaced))

    # ----------------------------------------------------------------- config and keys
    def _read_config(self) -> dict:
        try:
            cfg = json.loads(self._config_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{self._config_file}: not a readable adapter config ({exc})") from exc
        if not isinstance(cfg, dict):
            raise CheckpointError(f"{self._config_file}: not a JSON object")
        if cfg.get("peft_type", "LORA") != "LORA":
            raise CheckpointError(f"{self._config_file}: peft_type {cfg.get('peft_type')!r} is not LoRA "
                                  "(merge it into its base with peft and compress the merged model)")
        for flag in UNSUPPORTED_FLAGS:
            if cfg.get(flag):
                raise CheckpointError(f"{self._config_file}: {flag} adapters are not supported "
                                      "(merge it with peft's merge_and_unload and compress the merged model)")
        for key in ("r", "lora_alpha"):
            if not isinstance(cfg.get(key), (int, float)) or cfg[key] <= 0:
                raise CheckpointError(f"{self._config_file}: {key} must be a positive number, got {cfg.get(key)!r}")
        return cfg

    def _lora_settings(self) -> dict:
        """r, lora_alpha, rank/alpha patterns, use_rslora, fan_in_fan_out: as peft parses them when installed."""
        keys = ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "fan_in_fan_out")
        peft = _peft()
        if peft is None:
            return {k: self.adapter_config.get(k) for k in keys}
        try:
            parsed = peft[0].from_pretrained(str(self._path))
        except Exception as exc:  # noqa: BLE001 - peft raises ValueError/TypeError/KeyError on bad fields
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"{self._config_file}: peft cannot read it ({first})") from None
        return {k: getattr(parsed, k) for k in keys}

    def _classify_keys(self) -> None:
        suffixes = {".lora_A.weight": "a", ".lora_B.weight": "b", ".lora_B.bias": "bias",
                    ".lora_embedding_A": "ea", ".lora_embedding_B": "eb"}
        for key in sorted(self._entries):
            if not key.startswith(PEFT_PREFIX):
                raise CheckpointError(f"{self._weights}: unexpected tensor {key!r} (not under {PEFT_PREFIX!r})")
            rest = key[len(PEFT_PREFIX):]
            kind = next((k for s, k in suffixes.items() if rest.endswith(s)), None)
            if kind is None:
                if "lora_" in rest or "modules_to_save" in rest or "trainable_tokens" in rest:
                    raise CheckpointError(f"{self._weights}: unsupported adapter tensor {key!r}")
                name = self._checkpoint_name(rest.replace(".base_layer.", "."), key)
                self._replaced[name] = key
                continue
            module = rest[: -len(next(s for s, k in suffixes.items() if k == kind))]
            weight_name = self._checkpoint_name(module + ".weight", key)
            lora = self._modules.setdefault(weight_name, _LoraModule(module))
            setattr(lora, {"a": "a", "b": "b", "bias": "bias", "ea": "a", "eb": "b"}[kind], key)
            lora.embedding = lora.embedding or kind in ("ea", "eb")
        fan = bool(self._settings["fan_in_fan_out"])
        rslora = bool(self._settings["use_rslora"])
        for name, lora in self._modules.items():
            if lora.a is None or lora.b is None:
                raise CheckpointError(f"{self._weights}: module {lora.path!r} has only one of lora_A / lora_B")
            a_shape, b_shape = self._entries[lora.a].shape, self._entries[lora.b].shape
            if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1]:
                raise CheckpointError(f"{self._weights}: LoRA factors of {lora.path!r} have shapes {list(a_shape)}, "
                                      f"{list(b_shape)} (only 2-D lora_A [r, in] / lora_B [out, r] are supported)")
            r = a_shape[0]
            want_r = _pattern_value(self._settings["rank_pattern"], lora.path, self._settings["r"])
            if want_r != r:
                raise CheckpointError(f"{self._weights}: {lora.path!r} has rank {r} but the adapter config says {want_r}")
            alpha = _pattern_value(self._settings["alpha_pattern"], lora.path, self._settings["lora_alpha"])
            lora.scale = alpha / math.sqrt(r) if rslora else alpha / r
            rows, cols = b_shape[0], a_shape[1]
            transposed = lora.embedding or fan
            expect = (cols, rows) if transposed else (rows, cols)
            base_shape = self._shape_before_lora(name)
            if tuple(base_shape) != expect:
                raise CheckpointError(f"{self._weights}: LoRA of {lora.path!r} gives a {list(expect)} delta but "
                                      f"{name!r} is {list(base_shape)}")
            if lora.bias is not None:
                bias_name = name[: -len(".weight")] + ".bias"
                if bias_name not in self.base:
                    raise CheckpointError(f"{self._weights}: {lora.path!r} has a lora_B bias but the base module has "
                                          "no bias (peft cannot merge it either)")

    def _shape_before_lora(self, name: str) -> tuple[int, ...]:
        if name in self._replaced:
            return tuple(self._entries[self._replaced[name]].shape)
        return tuple(self.base.shape(name))

    def _checkpoint_name(self, module_tensor: str, key: str) -> str:
        """Base checkpoint name of module tensor `module_tensor` (transformers may rename on save)."""
        if module_tensor in self.base:
            return module_tensor
        if self._module_names is None:
            model = meta_causal_lm(self.base.config, self.base.path)
            shapes = {n: tuple(t.shape) for n, t in model.state_dict(keep_vars=True).items()}
            self._module_names = {n: ps[0].name for n, ps in revert_names(model, shapes, str(self.base.path)).items()
                                  if len(ps) == 1 and ps[0].whole}
        name = self._module_names.get(module_tensor)
        if name is None or name not in self.base:
            raise CheckpointError(f"{self._weights}: tensor {key!r} is for {module_tensor!r}, which the base "
                                  f"{self.base.path} does not have")
        return name

    # ----------------------------------------------------------------- CheckpointReader interface
    @property
    def path(self) -> Path:
        """The adapter directory."""
        return self._path

    @property
    def tokenizer_path(self) -> Path:
        """Where to load the tokenizer from: the adapter directory when it has one, else the base."""
        return self._path if (self._path / "tokenizer_config.json").is_file() else self.base.path

    @property
    def config(self):
        return self.base.config

    @property
    def config_dict(self) -> dict:
        return self.base.config_dict

    @property
    def model_type(self) -> str:
        return self.base.model_type

    @property
    def tensor_names(self) -> list[str]:
        return list(self._names)

    @property
    def tied_embeddings(self) -> bool:
        return self.base.tied_embeddings and "lm_head.weight" not in self._replaced

    def __contains__(self, name: str) -> bool:
        return name in self._replaced or name in self.base

    def __repr__(self) -> str:
        return f"LoraFinetunedReader({str(self.base.path)!r} + {str(self._path)!r}, lora modules={len(self._modules)})"

    @property
    def lora_targets(self) -> list[str]:
        """Checkpoint names of the tensors LoRA changes (weights; biases with lora_bias are extra)."""
        return sorted(self._modules)

    def _bias_owner(self, name: str) -> _LoraModule | None:
        if not name.endswith(".bias"):
            return None
        lora = self._modules.get(name[: -len(".bias")] + ".weight")
        return lora if lora is not None and lora.bias is not None else None

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self._replaced:
            return tuple(self._entries[self._replaced[name]].shape)
        return self.base.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        """float32 for LoRA'd linear weights, else the stored dtype (base's, or the adapter's for replacements)."""
        lora = self._modules.get(name)
        if lora is not None and not lora.embedding:
            return torch.float32
        if name in self._replaced:
            return self._adapter(self._replaced[name]).dtype
        return self.base.dtype(name)

    def _adapter(self, key: str) -> torch.Tensor:
        if self._handle is None:
            self._handle = safe_open(str(self._weights), framework="pt", device="cpu")
        try:
            tensor = self._handle.get_tensor(key)
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"{self._weights}: cannot read tensor {key!r} ({exc})") from exc
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{self._weights}: tensor {key!r} holds NaN/Inf values")
        return tensor

    def lora_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(s·B [out, r], A [r, in]) float32 with ΔW = (s·B)·A for LoRA'd linear weight `name`, else None."""
        lora = self._modules.get(name)
        if lora is None or lora.embedding:
            return None
        a, b = self._adapter(lora.a).float(), self._adapter(lora.b).float()
        if self._settings["fan_in_fan_out"]:
            return (lora.scale * a.T).contiguous(), b.T.contiguous()
        return lora.scale * b, a

    def lora_delta(self, name: str) -> torch.Tensor | None:
        """ΔW float32 (shape of `name`) that LoRA adds to tensor `name`, or None."""
        bias_of = self._bias_owner(name)
        if bias_of is not None:
            return bias_of.scale * self._adapter(bias_of.bias).float()
        lora = self._modules.get(name)
        if lora is None:
            return None
        if lora.embedding:
            return lora.scale * (self._adapter(lora.b).float() @ self._adapter(lora.a).float()).T
        left, right = self.lora_factors(name)
        return left @ right

    def get(self, name: str, dtype: torch.dtype | None = torch.float32, device="cpu",
            check_finite: bool = True) -> torch.Tensor:
        """The merged tensor `name` (see the module docstring), converted to `dtype` (None: self.dtype(name))."""
        if name in self._replaced:
            tensor = self._adapter(self._replaced[name])
        else:
            tensor = self.base.get(name, dtype=None, check_finite=check_finite)
        delta = self.lora_delta(name)
        if delta is not None:
            tensor = (tensor.to(torch.float32) + delta).to(self.dtype(name))
        return tensor.to(device=device, dtype=dtype if dtype is not None else tensor.dtype)

    def aux_files(self) -> dict[str, bytes]:
        """The base's side files, with the adapter's tokenizer files (if any) taking precedence."""
        files = self.base.aux_files()
        for item in sorted(self._path.iterdir()):
            if item.is_file() and item.name.startswith(TOKENIZER_FILE_PREFIXES) and item.name.endswith(AUX_SUFFIXES) \
                    and not aux_name_problem(item.name):
                files[item.name] = item.read_bytes()
        return files

    def content_hash(self, names: list[str] | None = None, full: bool = False) -> str:
        """sha256 over the base's content hash (of `names`), the adapter config and the adapter weights
        (sampled as CheckpointReader.content_hash; every byte with `full`)."""
        digest = hashlib.sha256(self.base.content_hash(
            None if names is None else [n for n in names if n in self.base], full=full).encode())
        digest.update(json.dumps(self.adapter_config, sort_keys=True).encode())
        size = self._weights.stat().st_size
        with open(self._weights, "rb") as handle:
            if full or size <= HASH_FULL_BYTES:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
            else:
                span = size - HASH_CHUNK_BYTES
                for k in range(HASH_CHUNKS):
                    handle.seek(k * span // (HASH_CHUNKS - 1))
                    digest.update(handle.read(HASH_CHUNK_BYTES))
        digest.update(str(size).encode())
        return digest.hexdigest()

    # ----------------------------------------------------------------- sizes for `info`
    @property
    def delta_params(self) -> dict:
        """What a delta file records about its adapter (DeltaFile.params entries).

        lora_adapter_bytes: the LoRA factors of the linear targets at 16 bits per entry (the size the
        compressed linears are to be compared with); lora_adapter_file_bytes: adapter_model.safetensors
        on disk (all tensors, stored dtype); lora_rank: the largest r.
        """
        linear = [lora for lora in self._modules.values() if not lora.embedding]
        entries = sum(math.prod(self._entries[k].shape) for lora in linear for k in (lora.a, lora.b))
        return {"lora_adapter_bytes": 2 * entries, "lora_adapter_file_bytes": os.path.getsize(self._weights),
                "lora_rank": max((self._entries[lora.a].shape[0] for lora in self._modules.values()), default=0)}
