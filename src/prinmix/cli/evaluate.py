"""`prinmix eval` and `prinmix report`: parsers, and commands that call the evaluation API and print.

    prinmix eval BASE DELTA... [--finetuned FT] [--metrics error,ppl,tasks] [--tasks SPEC,...] -o results.json
    prinmix report DELTA [-o DIR] [--eval results.json] [--base BASE --finetuned FT]

The commands import the evaluation modules inside their bodies (the CLI's lazy-loading exception:
`prinmix --help` loads no torch).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import PrinmixError
from .progress import LayerProgress


def _split(spec: str | None) -> list[str]:
    return [s.strip() for s in (spec or "").split(",") if s.strip()]


def cmd_eval(a) -> int:
    from transformers.utils import logging as hf_logging

    from ..evaluate.results import format_results, result_paths, write_results
    from ..evaluate.run import EvalConfig, run_eval
    from ..format.output_safety import refuse_input_overlap

    hf_logging.disable_progress_bar()  # the per-model "Loading weights" bars of transformers would drown the table
    if a.output:  # before the evaluation: its outputs must not replace any input
        inputs = [a.base, *a.deltas, a.finetuned, a.calib, a.ppl_data, *_split(a.tasks)]
        refuse_input_overlap(result_paths(a.output), [p for p in inputs if p and Path(p).exists()], "eval")
    config = EvalConfig(metrics=a.metrics, tasks=tuple(_split(a.tasks)), calib=a.calib, nsamples=a.nsamples,
                        seqlen=a.seqlen, seed=a.seed, ppl_data=a.ppl_data, ppl_seqlen=a.ppl_seqlen,
                        ppl_stride=a.ppl_stride, ppl_tokens=a.ppl_tokens, limit=a.limit, batch_size=a.batch_size,
                        max_new_tokens=a.max_new_tokens, num_fewshot=a.num_fewshot, device=a.device,
                        dtype=a.dtype)
    results = run_eval(a.base, a.deltas, finetuned=a.finetuned, config=config,
                       progress=None if a.quiet else LayerProgress("eq1 error"),
                       log=None if a.quiet else (lambda m: print(m, file=sys.stderr)))
    written = write_results(results, a.output) if a.output else []
    if a.json:
        print(json.dumps(results))
        return 0
    print(format_results(results, per_type=a.per_type))
    for p in written:
        print(f"wrote {p}")
    return 0


def cmd_report(a) -> int:
    from ..evaluate.report import ReportOptions, build_report

    if (a.base is None) != (a.finetuned is None):
        raise PrinmixError("--base and --finetuned go together (the true delta needs both)")
    options = ReportOptions(calib=a.calib, nsamples=a.nsamples, seqlen=a.seqlen, matrices=_split(a.matrices) or None,
                            device=a.device)
    out = build_report(a.delta, a.output, eval_json=a.eval, base=a.base, finetuned=a.finetuned, options=options,
                       log=None if a.quiet else (lambda m: print(m, file=sys.stderr)))
    print(f"wrote {out}")
    return 0


def add_eval_parser(sub) -> None:
    e = sub.add_parser("eval", help="measure what deltas lost: Eq. 1 layer error, perplexity, task accuracy")
    e.add_argument("base", help="the base model: a checkpoint directory or a Hugging Face Hub id")
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
    e.add_argument("--seqlen", type=int, default=512,
                   help="tokens per held-out window (shortened to the model's context length if longer)")
    e.add_argument("--seed", type=int, default=None, help="held-out window seed (default 1234; compression uses 0)")
    e.add_argument("--ppl-data", default=None, help="perplexity text: builtin (default), a file, or a HF dataset")
    e.add_argument("--ppl-seqlen", type=int, default=512, help="perplexity window (shortened to the model's context)")
    e.add_argument("--ppl-stride", type=int, default=None, help="default: --ppl-seqlen (disjoint windows)")
    e.add_argument("--ppl-tokens", type=int, default=None, help="evaluate the first N tokens of the text (default 16384)")
    e.add_argument("--batch-size", type=int, default=8, help="sequences per forward")
    e.add_argument("--device", default="auto", help="auto, cpu or cuda")
    e.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"],
                   help="dtype the models are loaded in for perplexity and tasks")
    e.add_argument("--per-type", action="store_true", help="also print the per-projection-type tables (Table 15)")
    e.add_argument("-o", "--output", default=None,
                   help="results .json (also writes .csv: the table, .layers.csv: the per-linear errors)")
    e.add_argument("--quiet", action="store_true", help="no progress bars or log lines (warnings still print)")
    e.add_argument("--json", action="store_true", help="print the whole result as one JSON object")
    e.set_defaults(fn=cmd_eval)


def add_report_parser(sub) -> None:
    r = sub.add_parser("report", help="an HTML page of a delta's bit allocation (and eval results)")
    r.add_argument("delta", help="the delta file")
    r.add_argument("-o", "--output", default=None, help="directory (default: <delta stem>-report beside the delta)")
    r.add_argument("--eval", default=None, help="a results .json written by `prinmix eval -o`")
    r.add_argument("--base", default=None, help="with --finetuned: the true SVD (σ, original rank order, Kendall τ)")
    r.add_argument("--finetuned", default=None, help="with --base: the fine-tune the delta was made from")
    r.add_argument("--matrices", default=None,
                   help="comma-separated weight names for the σ² scaling / difference plots (default: a few)")
    r.add_argument("--calib", default=None, help="held-out text for the difference term's XXᵀ (default builtin)")
    r.add_argument("--nsamples", type=int, default=8, help="held-out windows for the difference term")
    r.add_argument("--seqlen", type=int, default=256, help="tokens per held-out window")
    r.add_argument("--device", default="auto", help="auto, cpu or cuda")
    r.add_argument("--quiet", action="store_true", help="no log lines")
    r.set_defaults(fn=cmd_report)
