"""Representations of a vocabulary matrix's delta at one byte budget, on a real pair (not a test).

    python benchmarks/bench_vocab_rows.py --pair /work/pairs/smollm2-arith [--ratio 1/16]

The changed rows ΔE_R of the embedding (tied: input embedding and output head) are compressed to
α × their 16-bit size by each representation; printed: the objective J of vocab_delta.py (lookup rows
weighted by calibration token counts with the floor, head error with H = Σhhᵀ of the fine-tune's final
normed hidden states) relative to J(ΔE_R), its lookup and head parts, and the task tokens' lookup error.
Representations:
    prinmix-weighted   PrinMix with the row-weighted objective (what compress uses)
    prinmix-plain      PrinMix with H only (rows unweighted; identity H for an untied embedding)
    exact-top-k+rest   the k rows of largest weighted error stored exactly (bf16 + int32 index), the
                       remaining budget to prinmix-weighted on the other rows
    lowrank            truncated SVD in float16
Calibration: the built-in text, --nsamples × --seqlen tokens (default 32 × 256).

With --eval N, each representation is also put into the fine-tune in place of its embedding (everything
else exact) and measured: task accuracy on N held-out items and the logit error against the fine-tune on
held-out text (‖z − z_ft‖² / ‖z_ft − z_base‖², mean KL(ft ‖ model)); beside them the fine-tune with the
base's embedding (the embedding delta dropped: what the same bytes buy when embedding rows can only be
stored exactly, since they alone are 3× the whole 1/16 budget). The ratio the embedding gets is the α'
the vocabulary rows get in `compress`'s whole-delta plan with `--split proportional`
(whole_budget.plan_whole_budget) unless --ratio-own is given.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from real_pair import load_model, read_jsonl, task_accuracy  # noqa: E402

from prinmix.algorithms.budget import parse_ratio  # noqa: E402
from prinmix.algorithms.compress_matrix import compress_matrix  # noqa: E402
from prinmix.algorithms.vocab_delta import lookup_weights, vocab_objective  # noqa: E402
from prinmix.calibration.data import load_calibration  # noqa: E402
from prinmix.calibration.decoder_stack import DecoderStack  # noqa: E402
from prinmix.checkpoint.compatibility import check_compatible  # noqa: E402
from prinmix.checkpoint.reader import CheckpointReader  # noqa: E402
from prinmix.pipeline.whole_budget import plan_whole_budget  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pair", required=True)
    p.add_argument("--ratio", default="1/16")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--tops", default="64,512,4096")
    p.add_argument("--eval", type=int, default=0, help="task items for the accuracy of each variant (0: none)")
    p.add_argument("--ratio-own", action="store_true", help="the embedding at α itself, not the plan's α'")
    a = p.parse_args(argv)
    torch.set_grad_enabled(False)
    pair = Path(a.pair)
    alpha = parse_ratio(a.ratio)
    base, tok = load_model(pair / "base")
    if not a.ratio_own:
        base_r, ft_r = CheckpointReader(pair / "base"), CheckpointReader(pair / "finetuned")
        plan_ids = load_calibration(None, tok, a.nsamples, a.seqlen, 0)
        counts = torch.bincount(plan_ids.flatten(), minlength=ft_r.config.vocab_size)
        plan = plan_whole_budget(DecoderStack(ft_r), base_r, ft_r, check_compatible(base_r, ft_r), alpha, "prinmix",
                                 None, counts, None, None, "proportional")
        vocab_alpha = plan.split.vocab_share * plan.split.compressed_bits / (16 * plan.vocab_params)
        print(f"whole-delta plan at α={a.ratio}: linears α' = {plan.linear_alpha:.6f}, vocabulary rows "
              f"{vocab_alpha:.6f} ({plan.split.rule}; exact {plan.exact_bytes} B, overheads {plan.overhead_bytes} B)")
        alpha = vocab_alpha
    ft, _ = load_model(pair / "finetuned")
    name = "model.embed_tokens.weight"
    E0, E1 = base.get_input_embeddings().weight.float(), ft.get_input_embeddings().weight.float()
    tied = ft.get_output_embeddings().weight is ft.get_input_embeddings().weight
    changed = torch.nonzero((E0 != E1).any(1)).flatten()
    dE = (E1 - E0)[changed]
    ids = load_calibration(None, tok, a.nsamples, a.seqlen, 0)
    counts = torch.bincount(ids.flatten(), minlength=E0.shape[0]).double()
    c = lookup_weights(counts)[changed].float()
    H = None
    if tied:
        H = torch.zeros(E0.shape[1], E0.shape[1])
        for i in range(ids.shape[0]):
            h = ft(input_ids=ids[i:i + 1], output_hidden_states=True).hidden_states[-1][0].float()
            H += h.T @ h
    held = load_calibration(None, tok, 4, 256, 1234)
    z_ft, z_base = (torch.cat([m(input_ids=held[i:i + 1]).logits.float() for i in range(held.shape[0])])
                    for m in (ft, base))
    logp_ft = torch.log_softmax(z_ft, -1)
    emb = ft.get_input_embeddings().weight
    E1_copy = emb.detach().clone()

    def measure(new_emb: torch.Tensor) -> str:
        """Task accuracy and logit error of the fine-tune with its embedding (tied: also its head) = new_emb."""
        if not a.eval:
            return ""
        emb.data.copy_(new_emb.to(emb.dtype))
        z = torch.cat([ft(input_ids=held[i:i + 1]).logits.float() for i in range(held.shape[0])])
        rel = float((z - z_ft).pow(2).sum() / (z_ft - z_base).pow(2).sum())
        kl = float((logp_ft.exp() * (logp_ft - torch.log_softmax(z, -1))).sum(-1).mean())
        acc = task_accuracy(ft, tok, pair / "task_test.jsonl", limit=a.eval)
        emb.data.copy_(E1_copy)
        return f" {rel:>9.4f} {kl:>8.4f} {acc:>6.3f}"

    def with_rows(approx: torch.Tensor) -> torch.Tensor:
        out = E0.clone()
        out[changed] += approx
        return out

    del base
    task_tokens = {t for r in read_jsonl(pair / "task_test.jsonl") for t in tok(r["prompt"] + " " + r["answer"]).input_ids}
    pos = {int(r): i for i, r in enumerate(changed.tolist())}
    task_rows = torch.tensor([pos[t] for t in task_tokens if t in pos])
    Hz = H if H is not None else torch.zeros(dE.shape[1], dE.shape[1])
    J0 = vocab_objective(dE, c, Hz)
    n, d = dE.shape
    budget_bytes = int(alpha * 2 * n * d)
    print(f"{name}: {n} changed rows × {d}, tied={tied}, budget {budget_bytes / 2**20:.2f} MiB (α={a.ratio}); "
          f"calibration {ids.numel()} tokens; {len(task_rows)} task tokens")

    def report(label, approx, nbytes):
        R = dE - approx
        look = vocab_objective(R, c, None)
        head = vocab_objective(R, None, Hz)
        task = float((R[task_rows] ** 2).sum() / (dE[task_rows] ** 2).sum()) if len(task_rows) else float("nan")
        print(f"{label:<24} {nbytes / 2**20:>8.3f} {(look + head) / J0:>9.4f} {look / J0:>9.4f} {head / J0:>9.4f} "
              f"{task:>9.4f}" + measure(with_rows(approx)), flush=True)

    print(f"{'representation':<24} {'MiB':>8} {'J/J0':>9} {'lookup':>9} {'head':>9} {'task rows':>9}"
          + (f" {'logit rel':>9} {'KL':>8} {'acc':>6}" if a.eval else ""))
    report("exact (fine-tune)", dE, n * (2 * d + 4))
    report("dropped (base rows)", torch.zeros_like(dE), 0)
    m = compress_matrix(dE, Hz, alpha, "prinmix", row_weights=c)
    report("prinmix-weighted", m.reconstruct(), m.nbytes())
    m = compress_matrix(dE, H, alpha, "prinmix")
    report("prinmix-plain", m.reconstruct(), m.nbytes())
    row_err = c.double() * (dE.double() ** 2).sum(1) + ((dE.double() @ Hz.double()) * dE.double()).sum(1)
    order = torch.argsort(row_err, descending=True)
    for k in (int(x) for x in a.tops.split(",")):
        exact_bytes = k * (2 * d + 4)
        if exact_bytes >= budget_bytes:
            continue
        top, rest = order[:k], order[k:]
        r = (budget_bytes - exact_bytes) / (2 * len(rest) * d)
        m = compress_matrix(dE[rest], Hz, r, "prinmix", row_weights=c[rest])
        approx = torch.zeros_like(dE)
        approx[top] = dE[top].bfloat16().float()
        approx[rest] = m.reconstruct()
        report(f"exact-top-{k}+rest", approx, exact_bytes + m.nbytes())
    m = compress_matrix(dE, None, alpha, "lowrank")
    report("lowrank", m.reconstruct(), m.nbytes())
    return 0


if __name__ == "__main__":
    sys.exit(main())
