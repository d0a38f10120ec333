"""What a delta lost, layer by layer: the paper's Eq. 1 error ‖ΔW X − ΔŴ X‖² (Tables 7 and 15).

For every linear that some delta compresses, on held-out text (a calibration-style source drawn
with seed 1234, not compression's default seed 0):

    X        the inputs the *fine-tune* feeds that linear (the fine-tune is run layer by layer,
             so layer i sees the fine-tune's own hidden states, not a reconstruction's)
    ΔW       W_ft − W_base
    ΔŴ       W_rec − W_base, W_rec = the delta's reconstruction (prinmix.checkpoint.apply_delta)
    E        ΔW X − ΔŴ X = (W_ft − W_rec) X, one value per output activation (token × output channel)

Per linear and per delta:
    all      mean of E² over all output activations
    out      mean of E² over the outliers: the top `outlier_fraction` (1%) of output activations by
             absolute value in the fine-tune's own output W_ft X (+ bias) of that linear (Sec. 5.3)
    rel      ΣE² / Σ(ΔW X)² over all activations
    out_rel  the same over the outliers only

Aggregation (as in Table 15, whose "AVG" is the plain mean of the per-type numbers): a group's value
is the unweighted mean of its linears' values; per projection type (the module name's last component,
e.g. q_proj) × depth group; the "avg" row of a depth group is the unweighted mean of the per-type
values. Depth groups: with n layers, "low" is layers [0, n//3), "mid" [n//3, 2·(n//3)) and "high" the
rest (28 layers → 9 / 9 / 10, the paper's split); "all" is every layer.

Memory: one fine-tune decoder layer is built at a time (DecoderStack); the held-out hidden states,
one ΔW and one W_ft − W_rec per delta for the linear being measured live beside it. The outliers are
found exactly with a running top-k over mini-batches (the global top-k is inside the union of the
per-batch top-k's), so no activation tensor is kept.
"""

from __future__ import annotations

import csv
import io
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import AutoTokenizer

from ..calibration.data import load_calibration
from ..calibration.decoder_stack import DecoderStack
from ..calibration.layer_inputs import run_layer
from ..checkpoint.apply_delta import check_base, finetuned_tensor
from ..checkpoint.compatibility import check_compatible
from ..checkpoint.reader import CheckpointReader
from ..device import resolve_device
from ..errors import PrinmixError
from ..format.delta_file import load_delta
from .tables import format_grid, format_number

HELD_OUT_SEED = 1234
OUTLIER_FRACTION = 0.01
GROUPS = ("low", "mid", "high")
METRICS = ("all", "out", "rel", "out_rel")


# --------------------------------------------------------------------------- names and groups
def projection_type(weight_name: str) -> str:
    """Projection type of a weight name: its module's last name component ("...q_proj.weight" → "q_proj")."""
    parts = weight_name.split(".")
    if parts and parts[-1] in ("weight", "bias"):
        parts = parts[:-1]
    return parts[-1] if parts else weight_name


_LAYER_RE = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def layer_index_of(weight_name: str) -> int | None:
    """The first integer component of a dotted name ("model.layers.12.mlp.up_proj.weight" → 12), or None."""
    m = _LAYER_RE.search(weight_name)
    return int(m.group(1)) if m else None


def depth_group(layer: int, num_layers: int) -> str:
    """"low" for layers [0, n//3), "mid" for [n//3, 2·(n//3)), "high" for the rest."""
    third = num_layers // 3
    if layer < third:
        return "low"
    if layer < 2 * third:
        return "mid"
    return "high"


# --------------------------------------------------------------------------- accumulation
@dataclass
class LinearError:
    """Eq. 1 sums of one linear for one delta."""

    delta: str              # the delta's label
    name: str               # weight name, e.g. model.layers.3.self_attn.q_proj.weight
    layer: int
    type: str
    group: str
    n: int = 0              # output activations (tokens × h_out)
    sse: float = 0.0        # Σ (ΔW X − ΔŴ X)²
    ssd: float = 0.0        # Σ (ΔW X)²
    out_n: int = 0
    out_sse: float = 0.0
    out_ssd: float = 0.0

    def metrics(self) -> dict[str, float | None]:
        return {"all": self.sse / self.n if self.n else None,
                "out": self.out_sse / self.out_n if self.out_n else None,
                "rel": self.sse / self.ssd if self.ssd > 0 else None,
                "out_rel": self.out_sse / self.out_ssd if self.out_ssd > 0 else None}


class _TopK:
    """Running exact top-k of |y| over mini-batches, carrying per-entry payload rows along."""

    def __init__(self, k: int, n_payload: int):
        self.k, self.n_payload = k, n_payload
        self.values = torch.empty(0)
        self.payload = torch.empty(n_payload, 0)

    def add(self, values: torch.Tensor, payload: torch.Tensor) -> None:
        """values [m] (|y|), payload [n_payload, m]."""
        if self.k == 0:
            return
        if values.numel() > self.k:  # shrink the batch first: the global top-k is in the batch top-k's union
            top = torch.topk(values, self.k, sorted=False).indices
            values, payload = values[top], payload[:, top]
        values = torch.cat([self.values, values.cpu()])
        payload = torch.cat([self.payload, payload.cpu()], dim=1)
        if values.numel() > self.k:
            top = torch.topk(values, self.k, sorted=False).indices
            values, payload = values[top], payload[:, top]
        self.values, self.payload = values, payload


class _LinearProbe:
    """Forward hook on one fine-tune linear: accumulates E² and (ΔW X)² for every delta."""

    def __init__(self, records: list[LinearError], diffs: list[torch.Tensor], delta_w: torch.Tensor,
                 outlier_k: int):
        self.records, self.diffs, self.delta_w = records, diffs, delta_w
        self.top = _TopK(outlier_k, len(diffs) + 1)

    def __call__(self, module, args, output):
        x = args[0].detach()
        y = output[0] if isinstance(output, (tuple, list)) else output
        x = x.reshape(-1, x.shape[-1]).to(self.delta_w.dtype)
        d = x @ self.delta_w.T                          # ΔW X, [tokens, h_out]
        d2 = d.square()
        ssd = float(d2.sum(dtype=torch.float64))
        sq = []
        for rec, diff in zip(self.records, self.diffs):
            e2 = (x @ diff.T).square()                  # (ΔW X − ΔŴ X)²
            rec.n += e2.numel()
            rec.sse += float(e2.sum(dtype=torch.float64))
            rec.ssd += ssd
            sq.append(e2.reshape(-1))
        payload = torch.stack(sq + [d2.reshape(-1)])
        self.top.add(y.detach().reshape(-1).abs().float(), payload)

    def finish(self) -> None:
        if self.top.values.numel() == 0:
            return
        sums = self.top.payload.double().sum(dim=1)
        n = int(self.top.values.numel())
        for j, rec in enumerate(self.records):
            rec.out_n = n
            rec.out_sse = float(sums[j])
            rec.out_ssd = float(sums[-1])


# --------------------------------------------------------------------------- the computation
@dataclass
class LayerErrorResult:
    """Per-linear Eq. 1 records of one or more deltas, and their aggregations (see the module docstring)."""

    deltas: list[str]
    num_layers: int
    settings: dict
    records: list[LinearError] = field(default_factory=list)

    def summary(self) -> dict[str, dict[str, dict[str, float | None]]]:
        """{delta: {group or "all": {metric: value}}}: the unweighted mean over projection types of the
        per-type means (Table 7 / Table 15's AVG)."""
        by_type = self.by_type()
        out = {}
        for label in self.deltas:
            out[label] = {}
            for group in GROUPS + ("all",):
                out[label][group] = {}
                for metric in METRICS:
                    vals = [by_type[label][t][group][metric] for t in by_type[label]]
                    vals = [v for v in vals if v is not None]
                    out[label][group][metric] = sum(vals) / len(vals) if vals else None
        return out

    def by_type(self) -> dict[str, dict[str, dict[str, dict[str, float | None]]]]:
        """{delta: {projection type: {group or "all": {metric: unweighted mean over that type's linears}}}}."""
        out: dict = {}
        for label in self.deltas:
            recs = [r for r in self.records if r.delta == label]
            types = list(dict.fromkeys(r.type for r in recs))
            out[label] = {}
            for t in types:
                out[label][t] = {}
                for group in GROUPS + ("all",):
                    sel = [r.metrics() for r in recs if r.type == t and (group == "all" or r.group == group)]
                    out[label][t][group] = {
                        m: _mean([s[m] for s in sel]) for m in METRICS}
        return out

    def to_dict(self) -> dict:
        return {"settings": self.settings, "num_layers": self.num_layers, "deltas": self.deltas,
                "groups": {g: [i for i in range(self.num_layers) if depth_group(i, self.num_layers) == g]
                           for g in GROUPS},
                "summary": self.summary(), "by_type": self.by_type(),
                "records": [dict(asdict(r), **r.metrics()) for r in self.records]}

    def records_csv(self) -> str:
        """One CSV row per (delta, linear) with the raw sums and the four metrics."""
        buf = io.StringIO()
        fields = list(LinearError.__dataclass_fields__) + list(METRICS)
        w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
        w.writeheader()
        for r in self.records:
            w.writerow(dict(asdict(r), **r.metrics()))
        return buf.getvalue()


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def label_deltas(deltas) -> dict[str, Path]:
    """{label: path}: a dict is kept; a list gets the file stems as labels (made unique)."""
    if isinstance(deltas, dict):
        return {str(k): Path(v) for k, v in deltas.items()}
    out: dict[str, Path] = {}
    for p in deltas:
        p = Path(p)
        label, i = p.stem, 2
        while label in out:
            label, i = f"{p.stem}#{i}", i + 1
        out[label] = p
    return out


def layer_errors(base, finetuned, deltas, calib: str | None = None, nsamples: int = 16, seqlen: int = 512,
                 seed: int = HELD_OUT_SEED, device: str = "auto", batch_size: int = 4,
                 outlier_fraction: float = OUTLIER_FRACTION, progress=None) -> LayerErrorResult:
    """Eq. 1 errors of every compressed linear of each delta (see the module docstring).

    base, finetuned: checkpoint directories; deltas: a list of delta files (labelled by file stem) or
    {label: path}. calib: the held-out text source (load_calibration's: None/"builtin", a local
    .txt/.jsonl/.parquet, or a HF dataset); `seed` draws its windows. progress: callable(done, total, msg).
    """
    if not 0 < outlier_fraction <= 1:
        raise PrinmixError(f"outlier fraction must lie in (0, 1], got {outlier_fraction}")
    labelled = label_deltas(deltas)
    if not labelled:
        raise PrinmixError("no delta file given")
    dev = resolve_device(device)
    base_r, ft_r = CheckpointReader(base), CheckpointReader(finetuned)
    check_compatible(base_r, ft_r)
    loaded = {}
    for label, path in labelled.items():
        d = load_delta(path)
        check_base(base_r, d, path)
        loaded[label] = d
    try:
        tok = AutoTokenizer.from_pretrained(str(ft_r.path))
    except Exception as e:  # noqa: BLE001 - transformers raises many types
        raise PrinmixError(f"{ft_r.path}: cannot load its tokenizer ({e})") from None
    ids = load_calibration(calib, tok, nsamples, seqlen, seed)
    stack = DecoderStack(ft_r)
    inputs = stack.embed(ft_r, ids, dev, batch_size)
    n_layers = stack.num_layers
    n_tokens = ids.numel()
    compressed = set().union(*(set(d.matrices) for d in loaded.values()))
    result = LayerErrorResult(list(loaded), n_layers, {
        "calib": calib or "builtin", "nsamples": nsamples, "seqlen": seqlen, "seed": seed,
        "outlier_fraction": outlier_fraction, "activations": "fine-tune", "base": str(base_r.path),
        "finetuned": str(ft_r.path), "deltas": {k: str(v) for k, v in labelled.items()}})

    for i in range(n_layers):
        prefix = stack.layer_prefix(i)
        layer = stack.build_layer(i, stack.read_layer_state(ft_r, i), dev)
        modules = dict(layer.named_modules())
        probes, handles = [], []
        for lin in stack.linear_names(i):
            wname = prefix + lin + ".weight"
            if wname not in compressed or wname not in base_r:
                continue
            w_ft = ft_r.get(wname, torch.float32).to(dev)
            delta_w = w_ft - base_r.get(wname, torch.float32).to(dev)
            diffs = [w_ft - finetuned_tensor(wname, base_r, d, torch.float32).to(dev) for d in loaded.values()]
            recs = [LinearError(label, wname, i, projection_type(wname), depth_group(i, n_layers))
                    for label in loaded]
            k = math.ceil(outlier_fraction * n_tokens * w_ft.shape[0])
            probe = _LinearProbe(recs, diffs, delta_w, k)
            probes.append(probe)
            handles.append(modules[lin].register_forward_hook(probe))
        try:
            outputs = run_layer(layer, inputs, batch_size)
        finally:
            for h in handles:
                h.remove()
        for probe in probes:
            probe.finish()
            result.records.extend(probe.records)
        inputs = inputs.with_hidden(outputs)
        del layer, probes
        if progress:
            progress(i + 1, n_layers, f"layer {i}")
    return result


# --------------------------------------------------------------------------- printing
def format_summary_table(summary: dict, row_info: dict | None = None, metrics=("all", "out", "rel")) -> str:
    """Plain-text table: one row per delta, columns group × metric (Table 7's layout plus "rel")."""
    groups = GROUPS + ("all",)
    head = ["delta"] + (["method", "ratio"] if row_info else []) + [f"{g}/{m}" for g in groups for m in metrics]
    rows = []
    for label, per_group in summary.items():
        info = (row_info or {}).get(label, {})
        row = [label] + ([str(info.get("method", "")), str(info.get("ratio", ""))] if row_info else [])
        row += [format_number(per_group[g][m]) for g in groups for m in metrics]
        rows.append(row)
    return format_grid([head] + rows, n_head=1)


def format_type_table(by_type: dict, metric: str = "all") -> str:
    """Plain-text table of one metric: rows delta × projection type, columns low / mid / high / all (Table 15)."""
    rows = [["delta", "type"] + list(GROUPS) + ["all"]]
    for label, types in by_type.items():
        for t, groups in types.items():
            rows.append([label, t] + [format_number(groups[g][metric]) for g in GROUPS + ("all",)])
    return format_grid(rows, n_head=1)
