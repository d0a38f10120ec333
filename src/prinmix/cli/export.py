"""`prinmix export-lora`: the parser, and a command that calls prinmix.export.lora and prints its report.

The command imports the exporter inside its body (the CLI's lazy-loading exception: no torch for --help).
"""

from __future__ import annotations

from pathlib import Path

from ..export.vllm_limits import VLLM_MAX_LORA_RANKS

DTYPE_NAMES = ("bfloat16", "float16", "float32")


def cmd_export_lora(a) -> int:
    from ..export.lora import DTYPES, export_lora

    report = export_lora(a.base, a.delta, a.output, max_rank=a.max_rank, dtype=DTYPES[a.dtype],
                         allow_lossy=a.allow_lossy, overwrite=a.force)
    n_trunc = sum(m["exported_rank"] < m["rank"] for m in report["modules"].values())
    print(f"wrote {report['out_dir']}  (r = {report['r']}, lora_alpha = {report['lora_alpha']}, "
          f"{len(report['modules'])} modules: {', '.join(report['target_modules'])}, "
          f"{report['adapter_bytes']} bytes, {report['dtype']})")
    print(f"truncated modules: {n_trunc}; relative Frobenius error of the linear deltas: "
          f"{report['truncation_rel_error']:.3g} from truncation, {report['rel_error']:.3g} in total (with {report['dtype']})")
    if report["left_out"]:
        print(f"left out (not expressible as LoRA): {len(report['left_out'])} tensors, "
              f"{sum(report['left_out'].values())} bytes: {', '.join(sorted(report['left_out']))}")
    print(f"serve: vllm serve {Path(a.base).resolve()} --enable-lora --max-lora-rank {report['vllm_max_lora_rank']} "
          f"--lora-modules NAME={Path(report['out_dir']).resolve()}")
    return 0


def add_export_lora_parser(sub) -> None:
    """The `prinmix export-lora` subcommand, on the CLI's subparsers object."""
    p = sub.add_parser("export-lora", help="write a delta as a PEFT LoRA adapter (vLLM --enable-lora)")
    p.add_argument("base", help="the base model's checkpoint directory")
    p.add_argument("delta", help="the delta file")
    p.add_argument("-o", "--output", required=True, help="adapter directory")
    p.add_argument("--max-rank", type=int, default=None, choices=VLLM_MAX_LORA_RANKS,
                   help="truncate modules of larger rank to their best rank-R approximation")
    p.add_argument("--allow-lossy", action="store_true",
                   help="export even though norms/biases/embedding rows differ (they are left out)")
    p.add_argument("--dtype", default="float16", choices=DTYPE_NAMES, help="dtype of the adapter's factors")
    p.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    p.set_defaults(fn=cmd_export_lora)
