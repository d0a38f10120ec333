"""`prinmix demo`: the main job on a built-in default, offline.

Builds a tiny Llama base and a really fine-tuned copy locally (prinmix.tiny_models), compresses
the delta with every method at α = 1/16 and 1/32, merges each back and prints how much of the
fine-tune each reconstruction keeps.
"""

from __future__ import annotations

import tempfile
import time
import warnings
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from . import api
from .algorithms.methods import METHOD_NAMES
from .errors import WholeBudgetWarning
from .pipeline.config import CalibrationConfig
from .tiny_models import TinyModelFactory, arithmetic_lines


def _held_out_ids(tokenizer, n: int = 8, seqlen: int = 48) -> torch.Tensor:
    text = " ".join(arithmetic_lines(400, seed=999))
    ids = tokenizer(text, return_tensors="pt", verbose=False).input_ids[0]  # cut into windows below
    return ids[: n * seqlen].reshape(n, seqlen)


def _perplexity(logits: torch.Tensor, ids: torch.Tensor) -> float:
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    return float(torch.exp(nll))


def run_demo(workdir: str | None = None, ratios=("1/16", "1/32")) -> list[dict]:
    root = Path(workdir) if workdir else Path(tempfile.gettempdir()) / "prinmix-demo"
    print(f"building a tiny Llama base and fine-tune under {root} (cached after the first run)…", flush=True)
    base, ft = TinyModelFactory(root / "models").pair("llama", "bf16")
    tok = AutoTokenizer.from_pretrained(str(ft))
    ids = _held_out_ids(tok)

    def logits(path):
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
        with torch.no_grad():
            return model(ids).logits

    lb, lf = logits(base), logits(ft)
    gap = float((lb - lf).norm())
    rows = []
    for ratio in ratios:
        for method in METHOD_NAMES:
            if method == "bitdelta" and ratio != "1/16":
                continue
            delta = root / f"{method}-{ratio.replace('/', 'over')}.delta"
            t0 = time.time()
            with warnings.catch_warnings():  # the toy model's whole ratio above --ratio: the table's note says why
                warnings.simplefilter("ignore", WholeBudgetWarning)
                s = api.compress(base, ft, delta, ratio=ratio, method=method,
                                 calibration=CalibrationConfig(nsamples=16, seqlen=64))
            merged = api.merge(base, delta, root / f"merged-{delta.stem}", overwrite=True)
            lm = logits(merged)
            rows.append({"method": method, "ratio": ratio, "file_kib": s.file_bytes / 1024,
                         "whole_ratio": s.ratio_whole, "linear_ratio": s.ratio_achieved, "rel_logit_error": float((lm - lf).norm()) / gap,
                         "perplexity": _perplexity(lm, ids),
                         "seconds": time.time() - t0})
    print()
    print(f"{'method':<10} {'ratio':>6} {'file KiB':>9} {'whole ratio':>12} {'linear ratio':>13} {'logit error':>12} "
          f"{'perplexity':>11} {'time s':>7}")
    print(f"{'base':<10} {'':>6} {'':>9} {'':>12} {'':>13} {1.0:>12.4f} {_perplexity(lb, ids):>11.3f} {'':>7}")
    print(f"{'fine-tune':<10} {'':>6} {'':>9} {'':>12} {'':>13} {0.0:>12.4f} {_perplexity(lf, ids):>11.3f} {'':>7}")
    for r in rows:
        print(f"{r['method']:<10} {r['ratio']:>6} {r['file_kib']:>9.1f} {r['whole_ratio']:>12.5f} {r['linear_ratio']:>13.5f} "
              f"{r['rel_logit_error']:>12.4f} {r['perplexity']:>11.3f} {r['seconds']:>7.1f}")
    print("\nlogit error = ‖logits(merged) − logits(fine-tune)‖ / ‖logits(base) − logits(fine-tune)‖ on held-out "
          "arithmetic text (perplexity on the same text); whole ratio = every stored weight byte / the 16-bit size of all "
          "that differs (what --ratio budgets); linear ratio = the compressed linears' bytes / their 16-bit size. On this toy "
          "model the whole ratio ends above --ratio: the header entries of its tiny matrices (name, shape, checksum: "
          "~400 B each, a third of a 64×128 matrix's budget) are not charged to them (src/prinmix/pipeline/"
          "whole_budget.py); on a real model every byte is. Config/tokenizer files identical to the base's are taken "
          "from it.")
    return rows
