"""`prinmix eval` and `prinmix report`: argument parsers, the evaluation driver and its printing.

    prinmix eval BASE DELTA... [--finetuned FT] [--metrics error,ppl,tasks] [--tasks SPEC,...] -o results.json
    prinmix report DELTA [-o DIR] [--eval results.json] [--base BASE --finetuned FT]

`run_eval` is the Python API behind `prinmix eval`: it measures every delta given (and the base and
fine-tune where the metric applies) and returns one JSON-ready dict:

    {"prinmix_eval": 1, "base", "finetuned", "settings",
     "models": [{"label", "kind": base|finetuned|delta, "path", "method", "ratio_requested", "ratio_achieved",
                 "linear_bytes", "ratio_whole", "part_bytes"}],
     "layer_error": LayerErrorResult.to_dict() (Eq. 1; deltas only; needs FT),
     "perplexity": {"settings", "results": {label: {"ppl", "nll", "tokens", ...}}},
     "tasks": {"settings", "results": {label: {task: {"accuracy", "correct", "n", ...} or lm-eval metrics}}}}
"""

from __future__ import annotations

import csv
import io
import json
import sys
import time
from pathlib import Path

from ..errors import PrinmixError
from ..format.output_safety import refuse_input_overlap

EVAL_FORMAT = 1
ALL_METRICS = ("error", "ppl", "tasks")


# --------------------------------------------------------------------------- driver
def parse_metrics(spec: str | None, finetuned, tasks) -> list[str]:
    """Metrics to run. Default: error (when FT is given), ppl, and tasks (when task specs are given)."""
    if spec is None:
        chosen = (["error"] if finetuned else []) + ["ppl"] + (["tasks"] if tasks else [])
    else:
        chosen = [m.strip() for m in spec.split(",") if m.strip()]
        unknown = [m for m in chosen if m not in ALL_METRICS]
        if unknown or not chosen:
            raise PrinmixError(f"--metrics {spec!r}: choose among {', '.join(ALL_METRICS)} (comma-separated)")
    if "error" in chosen and not finetuned:
        raise PrinmixError("--metrics error needs --finetuned FT (the true delta and the fine-tune's activations)")
    if "tasks" in chosen and not tasks:
        raise PrinmixError("--metrics tasks needs --tasks (a .jsonl file of {\"prompt\", \"answer\"} or lm-eval task names)")
    return list(dict.fromkeys(chosen))


def run_eval(base, deltas, finetuned=None, metrics: list[str] | str | None = None, tasks: list[str] | None = None,
             calib: str | None = None, nsamples: int = 16, seqlen: int = 512, seed: int | None = None,
             ppl_data: str | None = None, ppl_seqlen: int = 512, ppl_stride: int | None = None,
             ppl_tokens: int | None = None, limit: int | None = None, batch_size: int = 8,
             max_new_tokens: int | None = None, num_fewshot: int | None = None, device: str = "auto",
             dtype: str = "float32", progress=None, log=None) -> dict:
    """Evaluate deltas against BASE (and FT): Eq. 1 layer errors, perplexity, task accuracy (see module doc)."""
    from ..api import resolve_device
    from ..models.checkpoint import CheckpointReader
    from . import layer_error as le
    from . import perplexity as pp
    from . import tasks as tk

    log = log or (lambda msg: None)
    tasks = list(tasks or [])
    if isinstance(metrics, (list, tuple)):
        metrics = ",".join(metrics)
    chosen = parse_metrics(metrics, finetuned, tasks)
    if not deltas:
        raise PrinmixError("no delta file given")
    for flag, value in (("nsamples", nsamples), ("seqlen", seqlen), ("ppl-seqlen", ppl_seqlen),
                        ("ppl-stride", ppl_stride), ("ppl-tokens", ppl_tokens), ("limit", limit),
                        ("batch-size", batch_size), ("max-new-tokens", max_new_tokens)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise PrinmixError(f"--{flag} must be a positive integer, got {value!r}")
    seed = le.HELD_OUT_SEED if seed is None else seed
    ppl_tokens = ppl_tokens or pp.DEFAULT_MAX_TOKENS
    CheckpointReader(base)  # validate early: one-line errors before any work
    if finetuned is not None:
        CheckpointReader(finetuned)
    if "tasks" in chosen:
        for spec in tasks:
            if tk.is_task_file(spec):
                tk.read_task_file(spec, 1)
        tk.require_lm_eval([s for s in tasks if not tk.is_task_file(s)])
    entries = pp.model_entries(base, deltas, finetuned)
    _check_bases(base, [e.path for e in entries if e.kind == "delta"])
    labelled = {e.label: e.path for e in entries if e.kind == "delta"}
    dev = resolve_device(device)
    out = {"prinmix_eval": EVAL_FORMAT, "base": str(base), "finetuned": str(finetuned) if finetuned else None,
           "settings": {"metrics": chosen, "device": str(dev), "dtype": dtype},
           "models": [e.describe() for e in entries]}
    t0 = time.time()
    if "error" in chosen:
        log("Eq. 1 layer errors (fine-tune activations, held-out windows)")
        res = le.layer_errors(base, finetuned, labelled, calib=calib, nsamples=nsamples, seqlen=seqlen, seed=seed,
                              device=str(dev), batch_size=batch_size, progress=progress)
        out["layer_error"] = res.to_dict()
    if "ppl" in chosen or "tasks" in chosen:
        ids = None
        if "ppl" in chosen:
            tok = pp.reference_tokenizer(base, labelled, finetuned)
            ids = pp.text_token_ids(ppl_data, tok, ppl_tokens)
            out["perplexity"] = {"settings": {"data": ppl_data or "builtin", "tokens": int(ids.numel()),
                                              "seqlen": ppl_seqlen, "stride": ppl_stride or ppl_seqlen},
                                 "results": {}}
        if "tasks" in chosen:
            out["tasks"] = {"settings": {"tasks": tasks, "limit": limit, "max_new_tokens": max_new_tokens,
                                         "num_fewshot": num_fewshot, "decoding": "greedy",
                                         "matching": "first line of the stripped continuation == stripped answer"},
                            "results": {}}
        for entry in entries:
            log(f"loading {entry.label} ({entry.kind})")
            with pp.open_model(entry, base, dev, dtype) as (model, tok):
                if ids is not None:
                    try:
                        r = pp.perplexity(model, ids, ppl_seqlen, ppl_stride)
                        out["perplexity"]["results"][entry.label] = r.to_dict()
                        log(f"  perplexity {r.ppl:.4g}")
                    except PrinmixError as e:  # e.g. a base whose vocabulary lacks the fine-tune's new tokens
                        out["perplexity"]["results"][entry.label] = {"error": str(e)}
                        log(f"  perplexity: {e}")
                if "tasks" in chosen:
                    out["tasks"]["results"][entry.label] = tk.run_tasks(model, tok, tasks, limit, batch_size,
                                                                        max_new_tokens, num_fewshot)
                    log("  " + ", ".join(f"{k} {_task_score(v)}" for k, v in out["tasks"]["results"][entry.label].items()))
    out["seconds"] = time.time() - t0
    return out


def _check_bases(base, delta_paths) -> None:
    """BaseMismatchError before any model is loaded when a delta was made for another base."""
    from ..format.delta_file import DeltaFile, read_metadata
    from ..models.apply_delta import check_base
    from ..models.checkpoint import CheckpointReader

    base_r = CheckpointReader(base)
    for path in delta_paths:
        meta = read_metadata(path)
        check_base(base_r, DeltaFile(meta["method"], float(meta["ratio"]), meta["params"],
                                     base_fingerprint=meta["base_fingerprint"]), path)


# --------------------------------------------------------------------------- tables
def _task_score(result: dict) -> str:
    """The headline number of a task result: accuracy for the built-in runner, else the first metric."""
    if "accuracy" in result:
        return f"{result['accuracy']:.3f}"
    for k, v in result.items():
        if isinstance(v, (int, float)) and "stderr" not in k:
            return f"{v:.3f}"
    return "-"


def _ratio(m: dict) -> str:
    r = m.get("ratio_achieved")
    return f"1/{1 / r:.3g}" if r else "-"


def _part_mib(parts: dict, key: str) -> str:
    """MiB of the compressed vocabulary part whose tensor name contains `key` ("lm_head", "embed")."""
    hit = [b for n, b in parts.items() if key in n and n not in ("linears", "exact")]
    return f"{sum(hit) / 2 ** 20:.3f}" if hit else "-"


def main_table_rows(results: dict) -> list[dict]:
    """One row per model: method, ratio, bytes, Eq. 1 (all layers: all/out/rel), ppl, task scores."""
    summary = results.get("layer_error", {}).get("summary", {})
    ppl = results.get("perplexity", {}).get("results", {})
    task_res = results.get("tasks", {}).get("results", {})
    task_names = list(dict.fromkeys(t for r in task_res.values() for t in r))
    rows = []
    for m in results["models"]:
        label = m["label"]
        parts = m.get("part_bytes") or {}
        row = {"model": label, "method": m.get("method", m["kind"]),
               "whole_ratio": f"1/{1 / m['ratio_whole']:.3g}" if m.get("ratio_whole") else "-",
               "ratio": _ratio(m),
               "linear_MiB": f"{m['linear_bytes'] / 2 ** 20:.3f}" if m.get("linear_bytes") is not None else "-",
               "lm_head_MiB": _part_mib(parts, "lm_head"), "embed_MiB": _part_mib(parts, "embed"),
               "exact_MiB": f"{parts['exact'] / 2 ** 20:.3f}" if "exact" in parts else "-"}
        if "layer_error" in results:
            s = summary.get(label, {}).get("all", {})
            for k in ("all", "out", "rel"):
                v = s.get(k)
                row[f"eq1_{k}"] = _fmt(v)
        if "perplexity" in results:
            p = ppl.get(label, {})
            row["ppl"] = f"{p['ppl']:.4f}" if "ppl" in p else "-"
        for t in task_names:
            r = task_res.get(label, {}).get(t)
            row[t] = _task_score(r) if r else "-"
        rows.append(row)
    return rows


def _fmt(v) -> str:
    from .layer_error import _fmt as f

    return f(v)


def format_rows(rows: list[dict]) -> str:
    from .layer_error import _grid

    if not rows:
        return ""
    keys = list(rows[0])
    return _grid([keys] + [[str(r.get(k, "-")) for k in keys] for r in rows])


def rows_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    return buf.getvalue()


def format_results(results: dict, per_type: bool = False) -> str:
    """The terminal view of a run_eval result: the side-by-side table, Table 7's layout and (optionally) Table 15's."""
    from .layer_error import format_summary_table, format_type_table

    parts = [format_rows(main_table_rows(results))]
    le = results.get("layer_error")
    if le:
        info = {m["label"]: {"method": m.get("method", ""), "ratio": _ratio(m)} for m in results["models"]}
        parts.append("Eq. 1 error by depth group (all: mean over output activations; out: top 1% |fine-tune "
                     "output|; rel: error / ‖ΔW X‖²; groups: " +
                     ", ".join(f"{g} {v[0]}-{v[-1]}" if v else f"{g} -" for g, v in le["groups"].items()) + ")")
        parts.append(format_summary_table(le["summary"], info))
        if per_type:
            for metric in ("all", "out"):
                parts.append(f"Eq. 1 error per projection type ({metric})")
                parts.append(format_type_table(le["by_type"], metric))
    return "\n\n".join(parts)


def result_paths(path) -> list[Path]:
    """The files write_results may write for PATH: the .json, its .csv and its .layers.csv."""
    path = Path(path)
    return [path, path.with_suffix(".csv"), path.with_suffix(".layers.csv")]


def write_results(results: dict, path) -> list[Path]:
    """results.json, plus results.csv (the side-by-side table) and results.layers.csv (per-linear Eq. 1)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2))
    written = [path]
    csv_path = path.with_suffix(".csv")
    csv_path.write_text(rows_csv(main_table_rows(results)))
    written.append(csv_path)
    le = results.get("layer_error")
    if le:
        recs = le["records"]
        layers_path = path.with_suffix(".layers.csv")
        layers_path.write_text(rows_csv(recs))
        written.append(layers_path)
    return written


def load_eval_json(path) -> dict:
    """A `prinmix eval` result file, validated."""
    path = Path(path)
    if not path.is_file():
        raise PrinmixError(f"{path}: no such eval result file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PrinmixError(f"{path}: not a JSON file ({e})") from None
    if not isinstance(data, dict) or data.get("prinmix_eval") != EVAL_FORMAT or "models" not in data:
        raise PrinmixError(f"{path}: not a `prinmix eval` result (format {EVAL_FORMAT})")
    return data


# --------------------------------------------------------------------------- commands
def _progress(desc: str):
    state = {"bar": None}

    def cb(done, total, message):
        from tqdm import tqdm

        if state["bar"] is None:
            state["bar"] = tqdm(total=total, desc=desc, unit="layer", file=sys.stderr, dynamic_ncols=True)
        state["bar"].set_postfix_str(message)
        state["bar"].update(done - state["bar"].n)
        if done >= total:
            state["bar"].close()
    return cb


def _split(spec: str | None) -> list[str]:
    return [s.strip() for s in (spec or "").split(",") if s.strip()]


def cmd_eval(a) -> int:
    try:  # the per-model "Loading weights" bars of transformers would drown the table
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    if a.output:  # before the evaluation: its outputs must not replace any input
        inputs = [a.base, *a.deltas, a.finetuned, a.calib, a.ppl_data, *_split(a.tasks)]
        refuse_input_overlap(result_paths(a.output), [p for p in inputs if p and Path(p).exists()], "eval")
    results = run_eval(a.base, a.deltas, finetuned=a.finetuned, metrics=a.metrics, tasks=_split(a.tasks),
                       calib=a.calib, nsamples=a.nsamples, seqlen=a.seqlen, seed=a.seed, ppl_data=a.ppl_data,
                       ppl_seqlen=a.ppl_seqlen, ppl_stride=a.ppl_stride, ppl_tokens=a.ppl_tokens, limit=a.limit,
                       batch_size=a.batch_size, max_new_tokens=a.max_new_tokens, num_fewshot=a.num_fewshot,
                       device=a.device, dtype=a.dtype, progress=_progress("eq1 error"),
                       log=lambda m: print(m, file=sys.stderr))
    print(format_results(results, per_type=a.per_type))
    if a.output:
        for p in write_results(results, a.output):
            print(f"wrote {p}")
    return 0


def cmd_report(a) -> int:
    from .report import build_report

    if (a.base is None) != (a.finetuned is None):
        raise PrinmixError("--base and --finetuned go together (the true delta needs both)")
    out = build_report(a.delta, a.output, eval_json=a.eval, base=a.base, finetuned=a.finetuned, calib=a.calib,
                       nsamples=a.nsamples, seqlen=a.seqlen, matrices=_split(a.matrices) or None, device=a.device,
                       log=lambda m: print(m, file=sys.stderr))
    print(f"wrote {out}")
    return 0


def add_eval_parser(sub) -> None:
    e = sub.add_parser("eval", help="measure what deltas lost: Eq. 1 layer error, perplexity, task accuracy")
    e.add_argument("base")
    e.add_argument("deltas", nargs="+", metavar="DELTA", help="one or more delta files (compared side by side)")
    e.add_argument("--finetuned", default=None, help="the fine-tune (needed for the Eq. 1 error; also evaluated)")
    e.add_argument("--metrics", default=None,
                   help="comma-separated subset of error,ppl,tasks (default: error if --finetuned, ppl, tasks if --tasks)")
    e.add_argument("--tasks", default=None,
                   help="comma-separated: .jsonl files of {\"prompt\",\"answer\"} (exact match) and/or lm-eval task names")
    e.add_argument("--limit", type=int, default=None, help="at most this many items per task")
    e.add_argument("--max-new-tokens", type=int, default=None, help="greedy tokens per answer (default: longest answer + 2)")
    e.add_argument("--num-fewshot", type=int, default=None, help="lm-eval tasks only")
    e.add_argument("--calib", default=None, help="held-out text for the Eq. 1 error: builtin (default), a file, or a HF dataset")
    e.add_argument("--nsamples", type=int, default=16, help="held-out windows for the Eq. 1 error")
    e.add_argument("--seqlen", type=int, default=512, help="tokens per held-out window")
    e.add_argument("--seed", type=int, default=None, help="held-out window seed (default 1234; compression uses 0)")
    e.add_argument("--ppl-data", default=None, help="perplexity text: builtin (default), a file, or a HF dataset")
    e.add_argument("--ppl-seqlen", type=int, default=512)
    e.add_argument("--ppl-stride", type=int, default=None, help="default: --ppl-seqlen (disjoint windows)")
    e.add_argument("--ppl-tokens", type=int, default=None, help="evaluate the first N tokens of the text (default 16384)")
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--device", default="auto", help="auto, cpu or cuda")
    e.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"],
                   help="dtype the models are loaded in for perplexity and tasks")
    e.add_argument("--per-type", action="store_true", help="also print the per-projection-type tables (Table 15)")
    e.add_argument("-o", "--output", default=None,
                   help="results .json (also writes .csv: the table, .layers.csv: the per-linear errors)")
    e.set_defaults(fn=cmd_eval)


def add_report_parser(sub) -> None:
    r = sub.add_parser("report", help="an HTML page of a delta's bit allocation (and eval results)")
    r.add_argument("delta")
    r.add_argument("-o", "--output", default=None, help="directory (default: <delta stem>-report beside the delta)")
    r.add_argument("--eval", default=None, help="a results .json written by `prinmix eval -o`")
    r.add_argument("--base", default=None, help="with --finetuned: the true SVD (σ, original rank order, Kendall τ)")
    r.add_argument("--finetuned", default=None)
    r.add_argument("--matrices", default=None,
                   help="comma-separated weight names for the σ² scaling / difference plots (default: a few)")
    r.add_argument("--calib", default=None, help="held-out text for the difference term's XXᵀ (default builtin)")
    r.add_argument("--nsamples", type=int, default=8)
    r.add_argument("--seqlen", type=int, default=256)
    r.add_argument("--device", default="auto")
    r.set_defaults(fn=cmd_report)
