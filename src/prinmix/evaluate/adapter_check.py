"""Whole-model check of an exported LoRA adapter: logits of base + adapter (PEFT) against `prinmix merge`.

The adapter is meant to reproduce base + delta, so its error is measured where it matters — on the
model's output, not on the linear deltas alone (which leaves out everything a LoRA adapter must
absorb: norms folded into linears, embedding and lm_head rows, rank limits). On `n_tokens` tokens of a
text stream cut into windows of `seqlen`, per compared model X against a reference R (float32 logits
[n_tokens, vocab], B = the base's logits):
    max_abs_logit_error  max |X − R|
    rel_logit_error      ‖X − R‖_F / ‖R − B‖_F: the error as a fraction of the change the fine-tune makes
                         (0 = exact; 1 = as far from R as the base is)
    greedy_agreement     fraction of positions where argmax X = argmax R
    max_logprob_error    max |log_softmax X − log_softmax R|
Compared: adapter vs merge (always), adapter vs fine-tune and merge vs fine-tune (when a fine-tune is given).
The merge is `prinmix merge --dtype float32`: base + ΔŴ without rounding to the base's dtype. The adapter adds
ΔŴ to the base at run time (PEFT, vLLM), so against a merge rounded to a bfloat16 base's dtype it would be
charged with the merge's own rounding (on the SmolLM2 pair, a bfloat16 merge is 0.029 of the fine-tune's
change away from the fine-tune where the adapter is 0.018, and the two differ by 0.019).
One model is in memory at a time; the logits of the base, the merge (and the fine-tune) are kept.
"""

from __future__ import annotations

import gc

import torch

from ..errors import PrinmixError
from .perplexity import load_model, reconstructed_dir, text_token_ids

__all__ = ["compare_logits", "whole_model_check"]


def compare_logits(x: torch.Tensor, ref: torch.Tensor, base: torch.Tensor) -> dict:
    """The four figures of the module docstring for logits x against ref (base: the base model's logits);
    all [n, vocab] float32."""
    change = float((ref.double() - base.double()).norm())
    err = float((x.double() - ref.double()).norm())
    return {"max_abs_logit_error": float((x - ref).abs().max()),
            "rel_logit_error": err / change if change > 0 else (0.0 if err == 0 else float("inf")),
            "greedy_agreement": float((x.argmax(-1) == ref.argmax(-1)).double().mean()),
            "max_logprob_error": float((x.log_softmax(-1) - ref.log_softmax(-1)).abs().max())}


@torch.no_grad()
def _logits(model, windows: torch.Tensor) -> torch.Tensor:
    out = torch.cat([model(input_ids=w[None]).logits[0].float() for w in windows])
    del model
    gc.collect()
    return out


def whole_model_check(base_dir, delta_path, adapter_dir, finetuned=None, text: str | None = None,
                      n_tokens: int = 512, seqlen: int = 128) -> dict:
    """Compare base + adapter (PEFT, float32) with `prinmix merge` of the delta (and the fine-tune).

    text: a text source as `prinmix eval` reads it (None: the built-in text, which is also compression's
    default calibration text — pass an independent file for a held-out figure). Returns
    {"text", "tokens", "adapter_vs_merge": {...}, "adapter_vs_finetuned", "merge_vs_finetuned"}.
    """
    try:
        import peft
    except ImportError:
        raise PrinmixError("the whole-model check of export-lora needs peft (pip install 'prinmix[export]'); "
                           "--no-check skips it") from None
    base_model, tokenizer = load_model(base_dir)
    ids = text_token_ids(text, tokenizer, n_tokens)
    seqlen = min(seqlen, ids.numel())
    windows = ids[: ids.numel() // seqlen * seqlen].view(-1, seqlen)
    base = _logits(base_model, windows)
    with reconstructed_dir(base_dir, delta_path, dtype="float32") as merged_dir:
        merged = _logits(load_model(merged_dir)[0], windows)
    adapter_model = peft.PeftModel.from_pretrained(load_model(base_dir)[0], str(adapter_dir)).eval()
    adapter = _logits(adapter_model, windows)
    report = {"text": "built-in text" if text is None else str(text), "tokens": int(windows.numel()),
              "adapter_vs_merge": compare_logits(adapter, merged, base)}
    if finetuned is not None:
        ft = _logits(load_model(finetuned)[0], windows)
        report["adapter_vs_finetuned"] = compare_logits(adapter, ft, base)
        report["merge_vs_finetuned"] = compare_logits(merged, ft, base)
    return report
