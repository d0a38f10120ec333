"""The result of `prinmix eval` (see evaluate/run.py for its shape): its tables, files and validation."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from ..errors import PrinmixError
from .layer_error import format_summary_table, format_type_table
from .tables import format_grid, format_number

__all__ = ["EVAL_FORMAT", "format_results", "format_rows", "load_eval_json", "main_table_rows", "ratio_label",
           "result_paths", "rows_csv", "task_score", "write_results"]

EVAL_FORMAT = 1


def task_score(result: dict) -> str:
    """The headline number of a task result: accuracy for the built-in runner, else the first metric."""
    if "accuracy" in result:
        return f"{result['accuracy']:.3f}"
    for k, v in result.items():
        if isinstance(v, (int, float)) and "stderr" not in k:
            return f"{v:.3f}"
    return "-"


def ratio_label(m: dict) -> str:
    r = m.get("ratio_achieved")
    return f"1/{1 / r:.3g}" if r else "-"


def main_table_rows(results: dict) -> list[dict]:
    """One row per model: method, ratio, bytes, Eq. 1 (all layers: all/out/rel), ppl, task scores."""
    summary = results.get("layer_error", {}).get("summary", {})
    ppl = results.get("perplexity", {}).get("results", {})
    task_res = results.get("tasks", {}).get("results", {})
    task_names = list(dict.fromkeys(t for r in task_res.values() for t in r))
    rows = []
    for m in results["models"]:
        label = m["label"]
        row = {"model": label, "method": m.get("method", m["kind"]), "ratio": ratio_label(m),
               "linear_MiB": f"{m['linear_bytes'] / 2 ** 20:.3f}" if m.get("linear_bytes") is not None else "-"}
        if "layer_error" in results:
            s = summary.get(label, {}).get("all", {})
            for k in ("all", "out", "rel"):
                v = s.get(k)
                row[f"eq1_{k}"] = format_number(v)
        if "perplexity" in results:
            p = ppl.get(label, {})
            row["ppl"] = f"{p['ppl']:.4f}" if "ppl" in p else "-"
        for t in task_names:
            r = task_res.get(label, {}).get(t)
            row[t] = task_score(r) if r else "-"
        rows.append(row)
    return rows


def format_rows(rows: list[dict]) -> str:
    if not rows:
        return ""
    keys = list(rows[0])
    return format_grid([keys] + [[str(r.get(k, "-")) for k in keys] for r in rows])


def rows_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    return buf.getvalue()


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
