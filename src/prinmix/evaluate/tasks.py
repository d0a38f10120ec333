"""Task accuracy of a model: a built-in exact-match runner for local JSONL files, and an
lm-evaluation-harness bridge used only when the optional `lm-eval` package is installed.

Built-in runner. A task file is JSONL, one {"prompt": str, "answer": str} object per line (other
fields are ignored; blank lines are skipped). Each prompt is tokenised verbatim (no special tokens
added, unless add_special_tokens=True), prompts are left-padded into batches, and the model
continues them by greedy decoding (do_sample=False) for at most `max_new_tokens` new tokens
(default: the longest answer's token count + 2, at least 4), stopping at its EOS token.

Matching rule: the prediction is the decoded continuation (special tokens dropped) stripped of
surrounding whitespace and cut at its first newline, stripped again; it is correct iff it equals
the answer stripped of surrounding whitespace, exactly (case- and character-sensitive; "159" is
right, "159." or "159 apples" is wrong). accuracy = correct / n.

lm-eval bridge. Any task spec that is not a .jsonl file is taken as an lm-eval task name and run with
lm_eval.simple_evaluate on an HFLM wrapping the in-memory model (base, fine-tune or reconstruction);
without lm-eval installed this raises a PrinmixError saying how to install it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..calibration.data import iter_jsonl_objects
from ..errors import PrinmixError

INSTALL_HINT = "pip install 'prinmix[eval]' (or pip install lm-eval)"


# --------------------------------------------------------------------------- task files
def is_task_file(spec: str) -> bool:
    """A local JSONL task file (an existing file, or any name ending in .jsonl) rather than an lm-eval task name."""
    p = Path(spec).expanduser()
    return p.suffix.lower() == ".jsonl" or p.is_file()


def read_task_file(path, limit: int | None = None) -> list[dict]:
    """[{"prompt", "answer"}] of a JSONL task file (the first `limit` items when given)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise PrinmixError(f"{path}: no such task file")
    rows = []
    for line_number, rec in iter_jsonl_objects(path):
        if not isinstance(rec.get("prompt"), str) or not isinstance(rec.get("answer"), (str, int, float)):
            raise PrinmixError(f"{path}:{line_number}: expected an object with string \"prompt\" and \"answer\"")
        rows.append({"prompt": rec["prompt"], "answer": str(rec["answer"])})
        if limit is not None and len(rows) >= limit:
            break
    if not rows:
        raise PrinmixError(f"{path}: no task items")
    return rows


def normalise_prediction(text: str) -> str:
    """The matching rule's view of a continuation: stripped, cut at the first newline, stripped again."""
    return text.strip().split("\n", 1)[0].strip()


# --------------------------------------------------------------------------- generation
def _pad_id(tokenizer) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if tid is not None:
            return int(tid)
    return 0


def generate_greedy(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 16,
                    add_special_tokens: bool = False) -> list[str]:
    """Greedy continuations (decoded, special tokens dropped, not normalised) of `prompts`, in order.

    Prompts are grouped by token length (less padding) into left-padded batches with attention masks.
    """
    if batch_size < 1:
        raise PrinmixError(f"batch size must be >= 1, got {batch_size}")
    device = next(model.parameters()).device
    encoded = [tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"] for p in prompts]
    if any(len(e) == 0 for e in encoded):
        raise PrinmixError("a task prompt is empty after tokenisation")
    order = sorted(range(len(prompts)), key=lambda j: len(encoded[j]))
    pad = _pad_id(tokenizer)
    out: list[str | None] = [None] * len(prompts)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            width = max(len(encoded[j]) for j in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for r, j in enumerate(idx):
                n = len(encoded[j])
                ids[r, width - n:] = torch.tensor(encoded[j])
                mask[r, width - n:] = 1
            gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                 temperature=None, top_p=None, top_k=None,
                                 pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
            texts = tokenizer.batch_decode(gen[:, width:], skip_special_tokens=True)
            for j, t in zip(idx, texts):
                out[j] = t
    return out  # type: ignore[return-value]


@dataclass
class TaskResult:
    task: str
    accuracy: float
    correct: int
    n: int
    max_new_tokens: int
    examples: list[dict] = field(default_factory=list)   # the first few {prompt, answer, prediction}

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def exact_match(model, tokenizer, rows: list[dict], task: str = "task", batch_size: int = 16,
                max_new_tokens: int | None = None, add_special_tokens: bool = False,
                n_examples: int = 5) -> TaskResult:
    """Exact-match accuracy of greedy continuations on [{"prompt", "answer"}] (see the matching rule)."""
    if not rows:
        raise PrinmixError(f"{task}: no task items")
    if max_new_tokens is None:
        longest = max(len(tokenizer(" " + r["answer"], add_special_tokens=False)["input_ids"]) for r in rows)
        max_new_tokens = max(4, longest + 2)
    raw = generate_greedy(model, tokenizer, [r["prompt"] for r in rows], max_new_tokens, batch_size,
                          add_special_tokens)
    preds = [normalise_prediction(t) for t in raw]
    correct = sum(p == r["answer"].strip() for p, r in zip(preds, rows))
    examples = [{"prompt": r["prompt"], "answer": r["answer"], "prediction": p}
                for r, p in list(zip(rows, preds))[:n_examples]]
    return TaskResult(task, correct / len(rows), correct, len(rows), max_new_tokens, examples)


# --------------------------------------------------------------------------- lm-eval bridge
def lm_eval_available() -> bool:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        return False
    return True


def require_lm_eval(task_names: list[str]) -> None:
    """Raise PrinmixError unless lm-eval is importable (checked before any model is loaded)."""
    if task_names and not lm_eval_available():
        raise PrinmixError(f"task(s) {', '.join(task_names)}: not local .jsonl files, and lm-eval tasks need the "
                           f"optional lm-eval package: {INSTALL_HINT}")


def run_lm_eval(model, tokenizer, task_names: list[str], limit: int | None = None, batch_size: int = 8,
                num_fewshot: int | None = None) -> dict:
    """{task: {metric: value}} from lm_eval.simple_evaluate on an HFLM wrapping the in-memory model."""
    require_lm_eval(task_names)
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    try:
        res = lm_eval.simple_evaluate(model=lm, tasks=list(task_names), limit=limit, num_fewshot=num_fewshot)
    except (KeyError, ValueError) as e:
        raise PrinmixError(f"lm-eval task(s) {', '.join(task_names)}: {e}") from None
    return {task: {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            for task, metrics in (res or {}).get("results", {}).items()}


def run_tasks(model, tokenizer, specs: list[str], limit: int | None = None, batch_size: int = 16,
              max_new_tokens: int | None = None, num_fewshot: int | None = None) -> dict:
    """{task name: result dict} for every spec: .jsonl files by the built-in runner (key: file stem,
    "accuracy" etc.), the rest in one lm-eval call (key: lm-eval's task name, its metrics)."""
    files = [s for s in specs if is_task_file(s)]
    names = [s for s in specs if not is_task_file(s)]
    out: dict = {}
    for spec in files:
        rows = read_task_file(spec, limit)
        key = Path(spec).stem
        out[key] = exact_match(model, tokenizer, rows, key, batch_size, max_new_tokens).to_dict()
    if names:
        out.update(run_lm_eval(model, tokenizer, names, limit, batch_size, num_fewshot))
    return out
