"""`prinmix compress`, `merge`, `info` and `demo`: parsers, and commands that call prinmix.api and print.

The commands import the API inside their bodies (the CLI's lazy-loading exception): building the
parser and `prinmix --help` must not load torch.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict

from ..algorithms.methods import METHOD_NAMES
from ..errors import BudgetError
from .progress import LayerProgress, format_bytes


def _split_rule(split: dict) -> str:
    """The split rule as the summary names it: the measured rule with the text it measured on."""
    probe = {"calibration+generated": "calibration text and the fine-tune's own samples",
             "calibration": "calibration text"}.get(split.get("probe", ""))
    return f"{split['rule']} on {probe}" if probe else split["rule"]


def cmd_compress(a) -> int:
    from .. import api
    from ..pipeline.events import progress_listener

    config = api.PrinMixConfig()
    if a.bits is not None:
        try:
            config.widths = tuple(int(b) for b in a.bits.split(","))
        except ValueError:
            raise BudgetError(f"--bits {a.bits!r}: expected comma-separated integers such as 0,2,3,4,8") from None
    if a.fmax is not None:
        config.fmax = a.fmax
    calibration = api.CalibrationConfig(calib=a.calib, nsamples=a.nsamples, seqlen=a.seqlen, seed=a.seed,
                                        batch_size=a.batch_size, offload=a.offload)
    listeners = [] if a.quiet else [progress_listener(LayerProgress("compress"))]
    s = api.compress(a.base, a.finetuned, a.output, ratio=a.ratio, method=a.method, config=config,
                     calibration=calibration, device=a.device, resume=not a.no_resume,
                     distill_steps=a.distill_steps, listeners=listeners, base_revision=a.base_revision,
                     finetuned_revision=a.finetuned_revision, exact_embeddings=a.exact_embeddings,
                     vocab_share=a.vocab_share, split=a.split)
    if a.json:
        print(json.dumps({**asdict(s), "ratio_achieved": s.ratio_achieved, "ratio_on_disk": s.ratio_on_disk,
                          "ratio_whole": s.ratio_whole}))
        return 0
    w = s.weight_bytes
    rows = [("whole delta (all weight bytes / 16-bit size of what differs)",
             f"{s.ratio_whole:.6g} (1/{1 / s.ratio_whole:.4g}): {format_bytes(w['total'])} of "
             f"{format_bytes(2 * s.whole_params)}" if s.ratio_whole else "-"),
            ("  decoder linears (+ header entries)", format_bytes(w["linear"])),
            *((f"  {name} (compressed rows)", format_bytes(b)) for name, b in w["vocab"].items()),
            ("  exact tensors (norms, biases, rows)", format_bytes(w["exact"])),
            *((("  shared by", f"{_split_rule(s.split)}: the embedding / lm_head rows get "
                f"{100 * s.split['vocab_share']:.1f} % of the compressed bits (proportional: "
                f"{100 * s.split['proportional_share']:.1f} %)"),) if s.split else ()),
            ("method", s.method), ("ratio requested", f"{s.ratio_requested:.6g} (1/{1 / s.ratio_requested:.4g})"
                                   + (" of the linears only (--exact-embeddings)" if s.exact_embeddings
                                      else " of the whole delta")),
            ("ratio achieved (linear deltas, all stored bytes)",
             f"{s.ratio_achieved:.6g} (1/{1 / s.ratio_achieved:.4g})" if s.ratio_achieved else "-"),
            ("ratio on disk (+ their header entries)",
             f"{s.ratio_on_disk:.6g} (1/{1 / s.ratio_on_disk:.4g})" if s.ratio_on_disk else "-"),
            ("compressed linear deltas", format_bytes(s.linear_bytes)
             + (f" ({s.linear_bytes / s.lora_adapter_bytes:.3g} of the LoRA adapter's "
                f"{format_bytes(s.lora_adapter_bytes)})" if s.lora_adapter_bytes else "")),
            ("exact other tensors (norms, biases, embedding rows)", format_bytes(s.other_bytes)),
            ("config/tokenizer files", format_bytes(s.aux_bytes)),
            ("file on disk", format_bytes(s.file_bytes)), ("layers", str(s.layers)), ("time", f"{s.seconds:.1f} s"),
            ("output", s.path)]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


def cmd_merge(a) -> int:
    from .. import api

    t0 = time.time()
    out = api.merge(a.base, a.delta, a.output, overwrite=a.force,
                    progress=None if a.quiet else LayerProgress("merge", "tensor"), revision=a.revision,
                    max_shard_size=a.max_shard_size, dtype=a.dtype)
    print(f"wrote {out} in {time.time() - t0:.1f} s")
    return 0


def cmd_info(a) -> int:
    from ..format.delta_info import describe_delta  # what api.info runs, without importing the whole API

    d = describe_delta(a.delta)
    if a.json:
        print(json.dumps(d.to_dict(), indent=2))
        return 0
    print(f"delta          {d.path}")
    w = d.weight_bytes
    print(f"whole delta    {d.ratio_whole:.6g} (all {format_bytes(w['total'])} stored for weights, header entries "
          f"included / 16-bit size {format_bytes(2 * d.whole_params)} of what differs"
          + ("; the ratio was requested for the linears only: --exact-embeddings)" if not d.whole_mode else ")"))
    print(f"  parts        decoder linears {format_bytes(w['linear'])}, "
          + "".join(f"{n} {format_bytes(b)}, " for n, b in w["vocab"].items())
          + f"exact tensors {format_bytes(w['exact'])}")
    print(f"method         {d.method}")
    print(f"ratio          requested {d.ratio_requested:.6g}, achieved {d.ratio_achieved:.6g} "
          f"(all stored bytes of the linear deltas / their 16-bit size)")
    print(f"ratio on disk  {d.ratio_on_disk:.6g} (the same, with their {format_bytes(d.linear_header_bytes)} of "
          f"header entries counted)")
    if d.ratio_vs_adapter is not None:
        print(f"vs LoRA        {d.ratio_vs_adapter:.4g} of the source adapter's 16-bit factors "
              f"({format_bytes(d.linear_bytes)} / {format_bytes(d.lora_adapter_bytes)})")
    print(f"file           {format_bytes(d.file_bytes)}  (linear {format_bytes(d.linear_bytes)}, "
          f"other tensors {format_bytes(d.other_bytes)}, config/tokenizer {format_bytes(d.aux_bytes)})")
    st = d.settings
    print(f"made with      prinmix {st.get('prinmix_version') or '(unknown version)'}: calib {st['calib']}, "
          f"{st['nsamples']}×{st['seqlen']} tokens, seed {st['seed']}"
          + (f", widths {','.join(map(str, st['widths']))}, fmax {st['fmax']}" if st.get("widths") else ""))
    print(f"base           {d.base.get('model_type')} content hash {d.base.get('content_hash', '')[:16]}…")
    if d.base.get("source"):
        rev, commit = d.base.get("revision"), d.base.get("commit")
        print(f"base model     {d.base['source']}" + (f" @ {rev}" if rev else "") + (f" (commit {commit})" if commit else ""))
    print(f"{'matrix':<48} {'shape':>12} {'rank':>5} {'bytes':>9} {'ratio':>8}  widths (bits: ranks)")
    for name, m in d.matrices.items():
        widths = " ".join(f"{b}:{k}" for b, k in m.widths.items())
        print(f"{name:<48} {'x'.join(map(str, m.shape)):>12} {m.rank:>5} {m.bytes:>9} "
              f"{m.ratio:>8.5f}  {widths}")
    for name, v in d.vocab.items():
        print(f"{name:<48} {'x'.join(map(str, v['shape'])):>12} {v['rank']:>5} {v['bytes']:>9}  "
              f"compressed delta of {v['rows']} changed rows")
    if d.other_tensors:
        print(f"other tensors stored exactly: {', '.join(d.other_tensors)}")
    return 0


def cmd_demo(a) -> int:
    from ..demo import run_demo

    run_demo(a.workdir)
    return 0


def _add_output_flags(parser, json_help: str) -> None:
    parser.add_argument("--quiet", action="store_true", help="no progress bars (warnings and errors still print)")
    parser.add_argument("--json", action="store_true", help=json_help)


def add_compress_parsers(sub) -> None:
    """The compress, merge, info and demo subcommands, on the CLI's subparsers object."""
    c = sub.add_parser("compress", help="compress FINETUNED against BASE into a delta file")
    c.add_argument("base", help="the base model: a checkpoint directory or a Hugging Face Hub id")
    c.add_argument("finetuned", help="the fine-tune: a checkpoint directory, a Hub id, or a PEFT LoRA adapter of BASE")
    c.add_argument("-o", "--output", required=True, help="the delta file to write")
    c.add_argument("--base-revision", default=None, help="Hub branch, tag or commit of BASE (default: main)")
    c.add_argument("--finetuned-revision", default=None, help="Hub branch, tag or commit of FINETUNED")
    c.add_argument("--ratio", default="1/16", help="1/16, 0.0625 or 16x (of the 16-bit delta)")
    c.add_argument("--method", default="prinmix", choices=METHOD_NAMES,
                   help="PrinMix, or a baseline: Delta-CoMe, truncated SVD (lowrank), BitDelta")
    c.add_argument("--calib", default=None, help="builtin (default), a .txt/.jsonl/.parquet file, or a HF dataset")
    c.add_argument("--nsamples", type=int, default=128, help="calibration windows")
    c.add_argument("--seqlen", type=int, default=2048,
                   help="tokens per calibration window (shortened to the model's context length if longer)")
    c.add_argument("--seed", type=int, default=0, help="which calibration windows")
    c.add_argument("--bits", default=None, help="candidate widths (default: 0,2,3,4,5,6,7,8)")
    c.add_argument("--fmax", type=int, default=None, help="at most this many distinct widths per matrix (default 4)")
    c.add_argument("--device", default="auto", help="auto, cpu or cuda")
    c.add_argument("--batch-size", type=int, default=8, help="calibration sequences per layer forward")
    c.add_argument("--no-resume", action="store_true", help="ignore the partial results of an interrupted run")
    c.add_argument("--offload", metavar="DIR", default=None,
                   help="keep the calibration hidden states in memory-mapped files in DIR instead of RAM "
                        "(for models whose calibration activations do not fit in memory)")
    c.add_argument("--exact-embeddings", action="store_true",
                   help="earlier behaviour, for comparison: --ratio holds for the decoder linears only and "
                        "embedding / lm_head rows, norms and biases that differ are stored exactly")
    c.add_argument("--split", choices=("measured", "proportional"), default="measured",
                   help="how the whole budget is shared between the linears and the embedding / lm_head rows: "
                        "by the KL divergence each part's compression is measured to cause on calibration text "
                        "and the fine-tune's own samples (measured, the default for PrinMix with calibration; "
                        "other methods and data-free runs are proportional) or one ratio for all "
                        "(proportional); src/prinmix/pipeline/budget_split.py")
    c.add_argument("--vocab-share", type=float, default=None, metavar="S",
                   help="for comparing splits: the embedding / lm_head rows' share of the compressed bits, "
                        "forced (default: by --split)")
    c.add_argument("--distill-steps", type=int, default=0,
                   help="bitdelta: Adam steps of scale distillation against the fine-tune's logits (0 = off)")
    _add_output_flags(c, json_help="print the summary as one JSON object")
    c.set_defaults(fn=cmd_compress)

    m = sub.add_parser("merge", help="write BASE + DELTA as a standard Hugging Face checkpoint")
    m.add_argument("base", help="the base the delta was made for: a checkpoint directory or a Hugging Face Hub id")
    m.add_argument("delta", help="the delta file")
    m.add_argument("-o", "--output", required=True, help="the checkpoint directory to write")
    m.add_argument("--revision", default=None, help="Hub branch, tag or commit of BASE (default: main)")
    m.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="cast every floating-point tensor (default: keep the base's dtype)")
    m.add_argument("--max-shard-size", default="5GB", help="safetensors shard size (huggingface_hub's layout)")
    m.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    m.add_argument("--quiet", action="store_true", help="no progress bar")
    m.set_defaults(fn=cmd_merge)

    i = sub.add_parser("info", help="describe a delta file")
    i.add_argument("delta", help="the delta file")
    i.add_argument("--json", action="store_true",
                   help="everything as one JSON object (sizes, base, per-matrix widths, the settings to rerun it)")
    i.set_defaults(fn=cmd_info)

    d = sub.add_parser("demo", help="build a tiny model pair locally, compress it with every method, report")
    d.add_argument("--workdir", default=None, help="where models and deltas go (default: a prinmix-demo temp dir)")
    d.set_defaults(fn=cmd_demo)
