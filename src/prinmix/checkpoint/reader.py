"""Read a Hugging Face causal-LM checkpoint directory tensor by tensor, without loading the model.

`CheckpointReader` takes a directory or a Hugging Face Hub id (resolved by hub.py to a
snapshot in the Hub cache), validates the directory up front (config, model type, safetensors weights, shard
index) and then serves single tensors streamed from the safetensors files. Tensor metadata (dtype,
shape, byte offsets) comes from the safetensors headers, parsed here directly, so asking for a
shape or a fingerprint never reads tensor data beyond what is needed. (The header is parsed with
`struct` rather than through `safe_open` because content_hash needs each tensor's byte offsets in the
file, which safe_open does not expose; tensor data itself is read through safe_open.)

Whether two checkpoints can be diffed tensor by tensor: compatibility.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from prinmix.checkpoint.hub import ModelSource, resolve_model_dir
from prinmix.errors import CheckpointError
from prinmix.format.file_names import AUX_SUFFIXES, aux_name_problem

SINGLE_WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"

# safetensors header dtype code -> torch dtype (only the codes torch can represent).
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
if hasattr(torch, "float8_e4m3fn"):
    SAFETENSORS_DTYPES["F8_E4M3"] = torch.float8_e4m3fn
    SAFETENSORS_DTYPES["F8_E5M2"] = torch.float8_e5m2
for _code, _name in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _name):
        SAFETENSORS_DTYPES[_code] = getattr(torch, _name)

# Files copied next to merged weights: everything small that describes the model or its tokenizer.
AUX_EXCLUDED = {
    WEIGHTS_INDEX_FILE,
    "pytorch_model.bin.index.json",
    "adapter_config.json",
    "trainer_state.json",
    "training_args.json",
    "all_results.json",
    "train_results.json",
    "eval_results.json",
}
AUX_MAX_BYTES = 64 * 1024 * 1024

# content_hash sampling: tensors up to SAMPLE_FULL_BYTES are hashed whole, larger ones by
# SAMPLE_CHUNKS chunks of SAMPLE_CHUNK_BYTES bytes at evenly spaced offsets.
SAMPLE_FULL_BYTES = 4096
SAMPLE_CHUNKS = 64
SAMPLE_CHUNK_BYTES = 64
FULL_HASH_READ_BYTES = 16 * 1024 * 1024  # content_hash(full=True) reads tensors in pieces of this size


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every entry of a floating tensor is finite. A float32 sum is NaN/Inf when any entry is, and
    finite otherwise unless it overflows (entries near 1e38): only then the exact per-entry test runs.
    ~5× faster than torch.isfinite(t).all() on bf16 (benchmarks/bench_resume_key.py)."""
    if tensor.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64) \
            and bool(torch.isfinite(tensor.sum(dtype=torch.float32))):
        return True
    return bool(torch.isfinite(tensor).all())


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: its shard file, dtype code, shape and absolute byte range in the file."""

    file: Path
    dtype_code: str
    shape: tuple[int, ...]
    start: int  # absolute offset of the first byte in `file`
    end: int  # absolute offset one past the last byte


def read_safetensors_header(file: Path) -> dict[str, TensorEntry]:
    """Parse a safetensors file's JSON header into {tensor name: TensorEntry}; CheckpointError if malformed."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{file}: not a safetensors file (shorter than 8 bytes)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > size - 8:
                raise CheckpointError(f"{file}: truncated safetensors file (header of {header_len} bytes)")
            header = json.loads(handle.read(header_len))
    except OSError as exc:
        raise CheckpointError(f"{file}: cannot read ({exc.strerror or exc})") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{file}: not a safetensors file (header is not JSON)") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: not a safetensors file (header is not a JSON object)")
    data_start = 8 + header_len
    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, stop = (int(v) for v in info["data_offsets"])
            entry = TensorEntry(file, str(info["dtype"]), tuple(int(d) for d in info["shape"]),
                                data_start + begin, data_start + stop)
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{file}: malformed safetensors header entry for tensor {name!r}") from exc
        if entry.end > size:
            raise CheckpointError(f"{file}: truncated safetensors file (tensor {name!r} ends past end of file)")
        entries[name] = entry
    return entries


class CheckpointReader:
    """One checkpoint directory: validated config plus lazily streamed safetensors tensors.

    Raises CheckpointError at construction when the directory is missing or unreadable, config.json
    is missing/unparseable, its model_type is unknown to transformers, or no complete safetensors
    weights are present.
    """

    def __init__(self, path: str | os.PathLike, revision: str | None = None) -> None:
        """path: a checkpoint directory or a Hugging Face Hub id (hub.py); revision: of the Hub id."""
        self._source = resolve_model_dir(path, revision)
        self._path = self._source.path
        self._check_directory()
        self._config_dict = self._read_config_json()
        self._model_type = self._check_model_type()
        self._config = self._load_config()
        self._entries = self._index_weights()
        self._tensor_names = sorted(self._entries)
        self._handles: dict[Path, object] = {}

    # ----------------------------------------------------------------- validation
    def _check_directory(self) -> None:
        if not self._path.exists():
            raise CheckpointError(f"{self._path}: no such directory")
        if not self._path.is_dir():
            raise CheckpointError(f"{self._path}: not a directory (expected a checkpoint directory)")
        if not os.access(self._path, os.R_OK | os.X_OK):
            raise CheckpointError(f"{self._path}: directory is not readable")

    def _read_config_json(self) -> dict:
        config_file = self._path / "config.json"
        if not config_file.is_file():
            raise CheckpointError(f"{self._path}: no config.json (not a Hugging Face model directory)")
        try:
            config_dict = json.loads(config_file.read_text(encoding="utf-8"))
        except OSError as exc:
            raise CheckpointError(f"{config_file}: cannot read ({exc.strerror or exc})") from exc
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{config_file}: not valid JSON ({exc})") from exc
        if not isinstance(config_dict, dict):
            raise CheckpointError(f"{config_file}: not a JSON object")
        return config_dict

    def _check_model_type(self) -> str:
        model_type = self._config_dict.get("model_type")
        if not model_type:
            raise CheckpointError(f"{self._path / 'config.json'}: no model_type field")
        if model_type not in CONFIG_MAPPING:
            raise CheckpointError(
                f"{self._path / 'config.json'}: model_type {model_type!r} is unknown to the installed "
                "transformers (custom code is not supported)"
            )
        return str(model_type)

    def _load_config(self):
        try:
            return AutoConfig.from_pretrained(str(self._path), local_files_only=True)
        except Exception as exc:  # transformers raises ValueError/KeyError/OSError/TypeError here
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"{self._path / 'config.json'}: transformers cannot load it ({first_line})") from exc

    def _index_weights(self) -> dict[str, TensorEntry]:
        single = self._path / SINGLE_WEIGHTS_FILE
        index = self._path / WEIGHTS_INDEX_FILE
        if single.is_file():
            return read_safetensors_header(single)
        if index.is_file():
            return self._index_shards(index)
        if (self._path / "pytorch_model.bin").exists() or (self._path / "pytorch_model.bin.index.json").exists():
            raise CheckpointError(
                f"{self._path}: holds only PyTorch .bin weights; convert to safetensors first "
                "(load it and call save_pretrained(dir), which writes model.safetensors)"
            )
        if (self._path / "adapter_config.json").exists():
            raise CheckpointError(
                f"{self._path}: is a PEFT adapter, not a full model; merge it into its base first "
                "(peft: merge_and_unload() then save_pretrained)"
            )
        raise CheckpointError(f"{self._path}: no {SINGLE_WEIGHTS_FILE} and no {WEIGHTS_INDEX_FILE}")

    def _index_shards(self, index: Path) -> dict[str, TensorEntry]:
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index}: not a valid safetensors index ({exc})") from exc
        shard_headers: dict[str, dict[str, TensorEntry]] = {}
        for shard in sorted(set(weight_map.values())):
            shard_file = self._path / shard
            if not shard_file.is_file():
                raise CheckpointError(f"{index}: names shard {shard!r}, which is missing from {self._path}")
            shard_headers[shard] = read_safetensors_header(shard_file)
        entries: dict[str, TensorEntry] = {}
        for name, shard in weight_map.items():
            if name not in shard_headers[shard]:
                raise CheckpointError(f"{self._path / shard}: lacks tensor {name!r} listed in {index.name}")
            entries[name] = shard_headers[shard][name]
        return entries

    # ----------------------------------------------------------------- properties
    @property
    def path(self) -> Path:
        """The checkpoint directory."""
        return self._path

    @property
    def source(self) -> ModelSource:
        """What the user gave (a directory or a Hub id) and, for the Hub, the revision and commit read."""
        return self._source

    @property
    def config(self):
        """The transformers PretrainedConfig loaded from config.json."""
        return self._config

    @property
    def config_dict(self) -> dict:
        """config.json as a plain dict (a copy)."""
        return json.loads(json.dumps(self._config_dict))

    @property
    def model_type(self) -> str:
        return self._model_type

    @property
    def tensor_names(self) -> list[str]:
        """All tensor names in the checkpoint, sorted."""
        return list(self._tensor_names)

    @property
    def tied_embeddings(self) -> bool:
        """True when the config ties lm_head to the input embedding and lm_head.weight is not stored."""
        text_config = self._config.get_text_config()
        tie = getattr(text_config, "tie_word_embeddings", getattr(self._config, "tie_word_embeddings", False))
        return bool(tie) and "lm_head.weight" not in self._entries

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __repr__(self) -> str:
        return f"CheckpointReader({str(self._path)!r}, model_type={self._model_type!r}, tensors={len(self._entries)})"

    # ----------------------------------------------------------------- tensors
    def _entry(self, name: str) -> TensorEntry:
        try:
            return self._entries[name]
        except KeyError:
            raise CheckpointError(f"{self._path}: no tensor named {name!r}") from None

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of tensor `name` from the safetensors header (no data read)."""
        return self._entry(name).shape

    def dtype(self, name: str) -> torch.dtype:
        """Stored torch dtype of tensor `name` from the safetensors header (no data read)."""
        entry = self._entry(name)
        try:
            return SAFETENSORS_DTYPES[entry.dtype_code]
        except KeyError:
            raise CheckpointError(f"{entry.file}: tensor {name!r} has unsupported dtype {entry.dtype_code}") from None

    def file_of(self, name: str) -> Path:
        """The safetensors file holding tensor `name`."""
        return self._entry(name).file

    def get(
        self,
        name: str,
        dtype: torch.dtype | None = torch.float32,
        device: str | torch.device = "cpu",
        check_finite: bool = True,
    ) -> torch.Tensor:
        """Read just tensor `name`, converted to `dtype` (None: stored dtype) on `device`.

        With check_finite, a floating tensor holding NaN or Inf raises CheckpointError naming the
        file and tensor (checked in the stored dtype, before conversion).
        """
        entry = self._entry(name)
        self.dtype(name)  # reject unsupported dtypes with a clear message
        try:
            tensor = self._handle(entry.file).get_tensor(name)
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"{entry.file}: cannot read tensor {name!r} ({exc})") from exc
        if check_finite and tensor.is_floating_point() and tensor.numel() and not all_finite(tensor):
            bad = int((~torch.isfinite(tensor)).sum())
            raise CheckpointError(f"{entry.file}: tensor {name!r} holds {bad} NaN/Inf values")
        return tensor.to(device=device, dtype=dtype if dtype is not None else tensor.dtype)

    def _handle(self, file: Path):
        handle = self._handles.get(file)
        if handle is None:
            handle = safe_open(str(file), framework="pt", device="cpu")
            self._handles[file] = handle
        return handle

    # ----------------------------------------------------------------- side files and fingerprint
    def aux_files(self) -> dict[str, bytes]:
        """{file name: bytes} of the small non-weight files a merged checkpoint needs.

        Top-level files ending in .json/.jinja/.model/.txt/.tiktoken (config.json,
        generation_config.json, tokenizer.json, tokenizer_config.json, special_tokens_map.json,
        tokenizer.model, vocab.json, merges.txt, chat_template.jinja, ...), excluding weight
        indexes, adapter/trainer state and files over 64 MiB.
        """
        files: dict[str, bytes] = {}
        for item in sorted(self._path.iterdir()):
            if not item.is_file() or item.name.startswith("."):
                continue
            if not item.name.endswith(AUX_SUFFIXES) or item.name in AUX_EXCLUDED:
                continue
            if aux_name_problem(item.name):  # a name a delta file may not carry (e.g. with spaces)
                continue
            if item.stat().st_size > AUX_MAX_BYTES:
                continue
            files[item.name] = item.read_bytes()
        return files

    def content_hash(self, names: list[str] | None = None, full: bool = False) -> str:
        """Hex sha256 fingerprint of the weights (all tensors, or `names`), stable across runs.

        Hashed, for each tensor in sorted name order: the UTF-8 name, the safetensors dtype code,
        the shape, the byte length, then its raw stored bytes: all of them for tensors of at most
        4096 bytes (or for every tensor with `full`), otherwise 64 chunks of 64 bytes at offsets
        k*(len-64)//63, k = 0..63 (so the first and last bytes are always included). Fields are
        separated by NUL/newline bytes. The file layout (sharding, header order) does not matter;
        config files are not hashed.

        Sampled (the default) is the base fingerprint a delta records: it tells bases apart, reads
        ~4 KiB per tensor, and is no defence against a deliberately edited base. `full` reads every
        byte (compress's resume key: a fine-tune edited only in unsampled bytes must not reuse stale
        resume parts; its cost is measured in benchmarks/bench_resume_key.py).
        """
        selected = sorted(self._entries) if names is None else sorted(names)
        digest = hashlib.sha256()
        handles: dict[Path, object] = {}
        try:
            for name in selected:
                entry = self._entry(name)
                length = entry.end - entry.start
                digest.update(name.encode("utf-8") + b"\0" + entry.dtype_code.encode() + b"\0")
                digest.update(repr(tuple(entry.shape)).encode() + b"\0" + str(length).encode() + b"\n")
                handle = handles.get(entry.file)
                if handle is None:
                    handle = handles[entry.file] = open(entry.file, "rb")
                if full or length <= SAMPLE_FULL_BYTES:
                    handle.seek(entry.start)
                    for offset in range(0, length, FULL_HASH_READ_BYTES):
                        digest.update(handle.read(min(FULL_HASH_READ_BYTES, length - offset)))
                    continue
                span = length - SAMPLE_CHUNK_BYTES
                for k in range(SAMPLE_CHUNKS):
                    handle.seek(entry.start + k * span // (SAMPLE_CHUNKS - 1))
                    digest.update(handle.read(SAMPLE_CHUNK_BYTES))
        except OSError as exc:
            raise CheckpointError(f"{self._path}: cannot read weights for hashing ({exc})") from exc
        finally:
            for handle in handles.values():
                handle.close()
        return digest.hexdigest()
