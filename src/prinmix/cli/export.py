"""`prinmix export-lora`: the parser, and a command that calls prinmix.export.lora and prints its report.

The command imports the exporter inside its body (the CLI's lazy-loading exception: no torch for --help).
"""

from __future__ import annotations

from pathlib import Path

from ..export.vllm_limits import VLLM_MAX_LORA_RANKS

DTYPE_NAMES = ("bfloat16", "float16", "float32")


def _figures(d: dict) -> str:
    return (f"greedy tokens agree {100 * d['greedy_agreement']:.2f} %, logit error {d['rel_logit_error']:.3g} of the "
            f"fine-tune's change (max |Δlogit| {d['max_abs_logit_error']:.3g})")


def cmd_export_lora(a) -> int:
    from ..export.lora import DTYPES, export_lora

    report = export_lora(a.base, a.delta, a.output, max_rank=a.max_rank, dtype=DTYPES[a.dtype],
                         allow_lossy=a.allow_lossy, overwrite=a.force, check=not a.no_check,
                         finetuned=a.finetuned, check_text=a.check_text, check_tokens=a.check_tokens)
    n_trunc = sum(m["exported_rank"] < m["rank"] for m in report["modules"].values())
    n_fold = sum(m["folded_norm"] for m in report["modules"].values())
    print(f"wrote {report['out_dir']}  (r = {report['r']}, lora_alpha = {report['lora_alpha']}, "
          f"{len(report['modules'])} modules: {', '.join(report['target_modules'])}; {n_fold} with norm changes "
          f"folded in; {report['adapter_bytes']} bytes, {report['dtype']})")
    print(f"truncated modules: {n_trunc}; relative Frobenius error of the modules' exact deltas: "
          f"{report['truncation_rel_error']:.3g} from truncation, {report['rel_error']:.3g} with {report['dtype']}")
    for _name, why in sorted(report["left_out"].items()):
        print(f"left out: {why}")
    whole = report["whole_model"]
    if whole is None:
        print("whole model: not checked (--no-check); the figures above are per module, not the model's error")
    else:
        print(f"whole model, {whole['tokens']} tokens of {whole['text']}: base + adapter (PEFT) vs prinmix merge --dtype float32: "
              f"{_figures(whole['adapter_vs_merge'])}")
        if "adapter_vs_finetuned" in whole:
            print(f"  vs the fine-tune: adapter {_figures(whole['adapter_vs_finetuned'])}; merge "
                  f"{_figures(whole['merge_vs_finetuned'])}")
    if report["vllm_max_lora_rank"] is None:
        print(f"vLLM cannot serve this adapter: r = {report['r']} exceeds its largest --max-lora-rank "
              f"({VLLM_MAX_LORA_RANKS[-1]}); export again with --max-rank {VLLM_MAX_LORA_RANKS[-1]} (each module "
              f"above it cut to its best rank-{VLLM_MAX_LORA_RANKS[-1]} approximation; the check shows the cost)")
        return 0
    print(f"serve: python -m vllm.entrypoints.openai.api_server --model {Path(a.base).resolve()} --enable-lora "
          f"--max-lora-rank {report['vllm_max_lora_rank']} --lora-modules NAME={Path(report['out_dir']).resolve()}")
    return 0


def add_export_lora_parser(sub) -> None:
    """The `prinmix export-lora` subcommand, on the CLI's subparsers object."""
    p = sub.add_parser("export-lora", help="write a delta (linears, norms, embeddings, lm_head) as a PEFT LoRA "
                                           "adapter (vLLM --enable-lora)")
    p.add_argument("base", help="the base model's checkpoint directory")
    p.add_argument("delta", help="the delta file")
    p.add_argument("-o", "--output", required=True, help="adapter directory")
    p.add_argument("--max-rank", type=int, default=None, choices=VLLM_MAX_LORA_RANKS,
                   help="truncate modules of larger rank to their best rank-R approximation")
    p.add_argument("--allow-lossy", action="store_true",
                   help="export even though some changed tensors cannot be carried (biases, residual norms…): "
                        "they are left out, and the whole-model check shows what that costs")
    p.add_argument("--dtype", default="float16", choices=DTYPE_NAMES, help="dtype of the adapter's factors")
    p.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--finetuned", default=None, help="also compare the adapter with this fine-tune's logits")
    p.add_argument("--check-text", default=None,
                   help="text for the whole-model check (default: the built-in text, also compression's default "
                        "calibration text; give held-out text for a held-out figure)")
    p.add_argument("--check-tokens", type=int, default=512, help="tokens of the whole-model check")
    p.add_argument("--no-check", action="store_true", help="skip the whole-model check (it loads the model 3-4 times)")
    p.set_defaults(fn=cmd_export_lora)
