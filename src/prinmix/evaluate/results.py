"""A `prinmix eval` result: its files (results.json / .csv / .layers.csv) and its side-by-side table.

The table has one row per model, numbers kept as numbers.

`main_table_rows` returns plain numbers (float/int) or None for "not measured", so `results.csv`
is machine-readable (a missing value is an empty cell, never "-"); `format_cell` renders a value for
the terminal and the HTML report (ratio as 1/N, errors with 3 significant digits, missing as "-").

Columns: model, method, whole_ratio (all weight bytes with header entries / 16-bit size of what differs),
ratio (achieved: stored bytes / 16-bit bytes of the linear deltas, a fraction),
linear_MiB, lm_head_MiB / embed_MiB (compressed vocabulary row deltas), exact_MiB (tensors stored
exactly), eq1_all / eq1_out / eq1_rel (Eq. 1 error over all layers, when measured), ppl (when
measured), then one column per task (accuracy, or the first metric lm-eval reports).
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from ..errors import PrinmixError
from .layer_error import format_summary_table, format_type_table
from .tables import format_grid

__all__ = ["EVAL_FORMAT", "format_cell", "format_results", "format_rows", "load_eval_json", "main_table_rows",
           "ratio_label", "result_paths", "rows_csv", "task_score", "write_results"]

EVAL_FORMAT = 1


def task_score(result: dict) -> float | None:
    """The headline number of a task result: accuracy for the built-in runner, else lm-eval's first metric."""
    if "accuracy" in result:
        return float(result["accuracy"])
    for k, v in result.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and "stderr" not in k:
            return float(v)
    return None


def _part_mib(parts: dict, key: str) -> float | None:
    """MiB of the compressed vocabulary part whose tensor name contains `key` ("lm_head", "embed")."""
    hit = [b for n, b in parts.items() if key in n and n not in ("linears", "exact")]
    return sum(hit) / 2 ** 20 if hit else None


def main_table_rows(results: dict) -> list[dict]:
    """One row per model of a run_eval result: {column: number, str or None} (see the module docstring)."""
    summary = results.get("layer_error", {}).get("summary", {})
    ppl = results.get("perplexity", {}).get("results", {})
    task_res = results.get("tasks", {}).get("results", {})
    task_names = list(dict.fromkeys(t for r in task_res.values() for t in r))
    rows = []
    for m in results["models"]:
        label = m["label"]
        lin = m.get("linear_bytes")
        parts = m.get("part_bytes") or {}
        row = {"model": label, "method": m.get("method", m["kind"]), "whole_ratio": m.get("ratio_whole") or None,
               "ratio": m.get("ratio_achieved") or None,
               "linear_MiB": lin / 2 ** 20 if lin is not None else None,
               "lm_head_MiB": _part_mib(parts, "lm_head"), "embed_MiB": _part_mib(parts, "embed"),
               "exact_MiB": parts["exact"] / 2 ** 20 if "exact" in parts else None}
        if "layer_error" in results:
            s = summary.get(label, {}).get("all", {})
            row.update({f"eq1_{k}": s.get(k) for k in ("all", "out", "rel")})
        if "perplexity" in results:
            row["ppl"] = ppl.get(label, {}).get("ppl")
        for t in task_names:
            r = task_res.get(label, {}).get(t)
            row[t] = task_score(r) if r else None
        rows.append(row)
    return rows


def format_cell(column: str, v) -> str:
    """A table value as text: missing "-", ratio "1/N", MiB with 3 decimals, other floats 3–4 significant digits."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if not isinstance(v, float):
        return str(v)
    if column in ("ratio", "whole_ratio"):
        return f"1/{1 / v:.3g}"
    if column.endswith("_MiB"):
        return f"{v:.3f}"
    if column == "ppl":
        return f"{v:.4f}"
    return f"{v:.3g}" if 1e-3 <= abs(v) < 1e4 or v == 0 else f"{v:.2e}"


def format_rows(rows: list[dict]) -> str:
    """The rows as an aligned text grid (the terminal view of `prinmix eval`)."""
    if not rows:
        return ""
    keys = list(rows[0])
    return format_grid([keys] + [[format_cell(k, r.get(k)) for k in keys] for r in rows])


def rows_csv(rows: list[dict]) -> str:
    """CSV with a header; numbers written as Python prints them (full precision), None as an empty cell."""
    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        w.writerows([{k: ("" if v is None else v) for k, v in r.items()} for r in rows])
    return buf.getvalue()


def ratio_label(m: dict) -> str:
    """A model entry's achieved ratio as "1/N" ("-" for the base and the fine-tune)."""
    return format_cell("ratio", m.get("ratio_achieved") or None)


def format_results(results: dict, per_type: bool = False) -> str:
    """The terminal view of a run_eval result: the side-by-side table, Table 7's layout and (optionally) Table 15's."""
    parts = [format_rows(main_table_rows(results))]
    le = results.get("layer_error")
    if le:
        info = {m["label"]: {"method": m.get("method", ""), "ratio": ratio_label(m)} for m in results["models"]}
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
