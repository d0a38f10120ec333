"""Apply a DeltaFile to base tensors, one tensor at a time (used by merge, eval and the runtime)."""

from __future__ import annotations

import hashlib

import torch

from ..errors import BaseMismatchError, DeltaFormatError
from ..format.delta_file import DeltaFile
from ..format.file_names import aux_name_problem
from .reader import CheckpointReader


def base_fingerprint(base: CheckpointReader) -> dict:
    """What a delta records of its base: model type, tensor count and a content hash (names,
    shapes, dtypes and sampled bytes of every tensor; see CheckpointReader.content_hash), plus where
    the base came from so a receiver knows what to fetch: source (Hub id or the path given), and for
    the Hub the revision asked for and the commit read. Only the hash decides a match (check_base)."""
    return {"model_type": base.model_type, "n_tensors": len(base.tensor_names),
            "content_hash": base.content_hash(), **base.source.record()}


def check_base(base: CheckpointReader, delta: DeltaFile, delta_path) -> None:
    """Raise BaseMismatchError when `delta` was made for another base than `base`."""
    want = delta.base_fingerprint
    if want.get("model_type") != base.model_type:
        raise BaseMismatchError(f"{delta_path}: made for a {want.get('model_type')!r} base, "
                                f"but {base.path} is {base.model_type!r}")
    if want.get("content_hash") != base.content_hash():
        raise BaseMismatchError(f"{delta_path}: made for another base model than {base.path} "
                                f"(weights fingerprint differs)")
    problem = names_problem(base, delta)
    if problem:
        raise DeltaFormatError(f"{delta_path}: {problem}")


def names_problem(base: CheckpointReader, delta: DeltaFile) -> str | None:
    """Why the tensors DELTA names do not fit BASE, or None. A crafted file passes its own checksums
    and the fingerprint check (both copied from a genuine file), so every name and shape it claims is
    checked here against the base: compressed matrices and row deltas replace base tensors of the same
    name and shape (width); dense tensors replace a base tensor of the same shape or add a new one;
    removed tensors exist; no name is claimed twice (exact rows and compressed rows of one matrix are
    one claim: added rows exact, changed existing rows compressed). Row deltas may grow a vocabulary only
    by rows they store (bounds the memory merge allocates)."""
    claimed: set[str] = set()
    for name, m in delta.matrices.items():
        if name not in base:
            return f"compressed matrix {name!r} is not a tensor of the base"
        if tuple(base.shape(name)) != tuple(m.shape):
            return f"compressed matrix {name!r} is {list(m.shape)}, the base's tensor is {list(base.shape(name))}"
        claimed.add(name)
    for name, (idx, _, shape) in delta.rows.items():
        if name not in base or len(base.shape(name)) != 2:
            return f"row delta {name!r} is not a 2-D tensor of the base"
        rows, width = base.shape(name)
        if width != shape[1] or shape[0] > rows + idx.numel():
            return f"row delta {name!r} of {list(shape)} does not fit the base's {[rows, width]}"
        if name in claimed:
            return f"tensor {name!r} is stored twice"
        claimed.add(name)
    for name, (idx, m, shape) in delta.vocab.items():   # compressed rows: existing rows of a base matrix
        if name not in base or len(base.shape(name)) != 2:
            return f"compressed rows {name!r} are not rows of a 2-D tensor of the base"
        rows, width = base.shape(name)
        exact = delta.rows.get(name)
        if width != shape[1] or m.shape[1] != width or (idx.numel() and int(idx.max()) >= rows) \
                or (exact is None and shape[0] != rows) or (exact is not None and list(exact[2]) != list(shape)):
            return f"compressed rows {name!r} of {list(shape)} do not fit the base's {[rows, width]}"
        if name in delta.matrices:
            return f"tensor {name!r} is stored twice"
        claimed.add(name)
    for name, t in delta.dense.items():
        if name in claimed:
            return f"tensor {name!r} is stored twice"
        if name in base and tuple(base.shape(name)) != tuple(t.shape):
            return f"dense tensor {name!r} is {list(t.shape)}, the base's tensor is {list(base.shape(name))}"
    for name in delta.params.get("removed_tensors", []):
        if name not in base or name in claimed or name in delta.dense:
            return f"removed tensor {name!r} is not an unchanged tensor of the base"
    return None


def output_tensor_names(base: CheckpointReader, delta: DeltaFile) -> list[str]:
    """Names of the fine-tune's tensors: the base's, minus those removed, plus those only in the fine-tune."""
    removed = set(delta.params.get("removed_tensors", []))
    names = [n for n in base.tensor_names if n not in removed]
    names += [n for n in delta.dense if n not in set(base.tensor_names)]
    return sorted(names)


def finetuned_tensor(name: str, base: CheckpointReader | None, delta: DeltaFile,
                     dtype: torch.dtype | None = None, base_tensor: torch.Tensor | None = None) -> torch.Tensor:
    """The reconstructed fine-tune tensor `name`: base + ΔŴ, a stored exact replacement, or the base.

    dtype None keeps the stored dtype (base dtype for linears and unchanged tensors).
    """
    if name in delta.dense:
        t = delta.dense[name]
        return t if dtype is None else t.to(dtype)
    w = base_tensor if base_tensor is not None else base.get(name, dtype=None)
    out_dtype = dtype or w.dtype
    if name in delta.matrices:
        m = delta.matrices[name]
        if tuple(w.shape) != m.shape:
            raise BaseMismatchError(f"delta matrix {name!r} is {list(m.shape)}, base tensor is {list(w.shape)}")
        return (w.to(torch.float32) + m.reconstruct(torch.float32)).to(out_dtype)
    if name in delta.rows or name in delta.vocab:
        shape = (delta.rows.get(name) or delta.vocab[name])[2]
        if w.ndim != 2 or w.shape[1] != shape[1]:
            raise BaseMismatchError(f"delta rows of {name!r} have width {shape[1]}, base tensor is {list(w.shape)}")
        # compressed rows: base + ΔŴ in float32, rounded once to the output dtype (as for linears)
        work = torch.float32 if name in delta.vocab else delta.rows[name][1].dtype
        out = torch.zeros(shape, dtype=work)
        n = min(shape[0], w.shape[0])
        out[:n] = w[:n].to(work)
        if name in delta.vocab:
            idx, m, _ = delta.vocab[name]
            out[idx] += m.reconstruct(torch.float32)
            out = out.to(out_dtype)
        if name in delta.rows:
            idx, values, _ = delta.rows[name]
            out[idx] = values.to(out.dtype)
        return out.to(out_dtype)
    return w.to(out_dtype)


def split_aux_files(base: CheckpointReader, finetuned) -> tuple[dict[str, bytes], dict[str, str]]:
    """The fine-tune's config/tokenizer files as (stored in the delta, taken from the base at merge).

    A file byte-identical to the base's file of the same name (usually the tokenizer: 2–9 MB for
    Llama-3/Qwen2, as much as the whole 1/16 delta of a small model) is not stored; the delta
    records its sha256 (`aux_from_base`) and merge copies it from the base, checked."""
    ft_files, base_files = finetuned.aux_files(), base.aux_files()
    stored = {n: b for n, b in ft_files.items() if base_files.get(n) != b}
    from_base = {n: hashlib.sha256(b).hexdigest() for n, b in ft_files.items() if n not in stored}
    return stored, from_base


def merged_aux_files(base: CheckpointReader, delta: DeltaFile, delta_path) -> dict[str, bytes]:
    """Every config/tokenizer file of the fine-tune: those stored in the delta, plus those it takes from
    the base (verified against their recorded sha256; BaseMismatchError naming the file otherwise)."""
    files = dict(delta.aux_files)
    for name, digest in sorted(delta.params.get("aux_from_base", {}).items()):
        problem = aux_name_problem(name)  # load_delta checked already; a DeltaFile built in memory is not
        if problem:
            raise DeltaFormatError(f"{delta_path}: aux_from_base: {problem}")
        path = base.path / name
        try:
            data = path.read_bytes()
        except OSError as e:
            raise BaseMismatchError(f"{delta_path}: needs the base's {name}, but {path} cannot be read "
                                    f"({e.strerror or e})") from None
        if hashlib.sha256(data).hexdigest() != digest:
            raise BaseMismatchError(f"{delta_path}: the fine-tune's {name} was the base's, but {path} differs "
                                    f"from it (sha256 mismatch)")
        files[name] = data
    return files
