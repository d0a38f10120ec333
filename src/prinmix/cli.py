"""`prinmix` command line: argument parsing, progress and printing only; the work is in prinmix.api."""

from __future__ import annotations

import argparse
import json
import sys
import time

from safetensors import SafetensorError

from .errors import BudgetError, PrinmixError


class LayerProgress:
    """A per-layer progress bar with ETA on stderr (tqdm)."""

    def __init__(self, desc: str):
        self.desc, self.bar = desc, None

    def __call__(self, done: int, total: int, message: str) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=total, desc=self.desc, unit="layer", file=sys.stderr, dynamic_ncols=True)
        self.bar.set_postfix_str(message)
        self.bar.update(done - self.bar.n)
        if done >= total:
            self.bar.close()


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n} B"


def cmd_compress(a) -> int:
    from . import api

    try:
        widths = tuple(int(b) for b in a.bits.split(","))
    except ValueError:
        raise BudgetError(f"--bits {a.bits!r}: expected comma-separated integers such as 0,2,3,4,8") from None
    s = api.compress(a.base, a.finetuned, a.output, ratio=a.ratio, method=a.method, calib=a.calib,
                     nsamples=a.nsamples, seqlen=a.seqlen, widths=widths, fmax=a.fmax, device=a.device,
                     batch_size=a.batch_size, resume=not a.no_resume, progress=LayerProgress("compress"),
                     distill_steps=a.distill_steps, offload=a.offload, exact_embeddings=a.exact_embeddings)
    w = s.weight_bytes
    rows = [("whole delta (all weight bytes / 16-bit size of what differs)",
             f"{s.ratio_whole:.6g} (1/{1 / s.ratio_whole:.4g}): {_fmt_bytes(w['total'])} of "
             f"{_fmt_bytes(2 * s.whole_params)}" if s.ratio_whole else "-"),
            ("  decoder linears (+ header entries)", _fmt_bytes(w["linear"])),
            *((f"  {name} (compressed rows)", _fmt_bytes(b)) for name, b in w["vocab"].items()),
            ("  exact tensors (norms, biases, rows)", _fmt_bytes(w["exact"])),
            ("method", s.method), ("ratio requested", f"{s.ratio_requested:.6g} (1/{1 / s.ratio_requested:.4g})"
                                   + (" of the linears only (--exact-embeddings)" if s.exact_embeddings
                                      else " of the whole delta")),
            ("ratio achieved (linear deltas, all stored bytes)",
             f"{s.ratio_achieved:.6g} (1/{1 / s.ratio_achieved:.4g})" if s.ratio_achieved else "-"),
            ("ratio on disk (+ their header entries)",
             f"{s.ratio_on_disk:.6g} (1/{1 / s.ratio_on_disk:.4g})" if s.ratio_on_disk else "-"),
            ("compressed linear deltas", _fmt_bytes(s.linear_bytes)
             + (f" ({s.linear_bytes / s.lora_adapter_bytes:.3g} of the LoRA adapter's "
                f"{_fmt_bytes(s.lora_adapter_bytes)})" if s.lora_adapter_bytes else "")),
            ("exact other tensors (norms, biases, embedding rows)", _fmt_bytes(s.other_bytes)),
            ("config/tokenizer files", _fmt_bytes(s.aux_bytes)),
            ("file on disk", _fmt_bytes(s.file_bytes)), ("layers", str(s.layers)), ("time", f"{s.seconds:.1f} s"),
            ("output", s.path)]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


def cmd_merge(a) -> int:
    from . import api

    t0 = time.time()
    out = api.merge(a.base, a.delta, a.output, overwrite=a.force, progress=LayerProgress("merge"))
    print(f"wrote {out} in {time.time() - t0:.1f} s")
    return 0


def cmd_info(a) -> int:
    from . import api

    d = api.info(a.delta)
    if a.json:
        print(json.dumps(d, indent=2))
        return 0
    print(f"delta          {d['path']}")
    w = d["weight_bytes"]
    print(f"whole delta    {d['ratio_whole']:.6g} (all {_fmt_bytes(w['total'])} stored for weights, header entries "
          f"included / 16-bit size {_fmt_bytes(2 * d['whole_params'])} of what differs"
          + ("; the ratio was requested for the linears only: --exact-embeddings)" if not d["whole_mode"] else ")"))
    print(f"  parts        decoder linears {_fmt_bytes(w['linear'])}, "
          + "".join(f"{n} {_fmt_bytes(b)}, " for n, b in w["vocab"].items())
          + f"exact tensors {_fmt_bytes(w['exact'])}")
    print(f"method         {d['method']}")
    print(f"ratio          requested {d['ratio_requested']:.6g}, achieved {d['ratio_achieved']:.6g} "
          f"(all stored bytes of the linear deltas / their 16-bit size)")
    print(f"ratio on disk  {d['ratio_on_disk']:.6g} (the same, with their {_fmt_bytes(d['linear_header_bytes'])} of "
          f"header entries counted)")
    if d["ratio_vs_adapter"] is not None:
        print(f"vs LoRA        {d['ratio_vs_adapter']:.4g} of the source adapter's 16-bit factors "
              f"({_fmt_bytes(d['linear_bytes'])} / {_fmt_bytes(d['lora_adapter_bytes'])})")
    print(f"file           {_fmt_bytes(d['file_bytes'])}  (linear {_fmt_bytes(d['linear_bytes'])}, "
          f"other tensors {_fmt_bytes(d['other_bytes'])}, config/tokenizer {_fmt_bytes(d['aux_bytes'])})")
    print(f"base           {d['base'].get('model_type')} content hash {d['base'].get('content_hash', '')[:16]}…")
    print(f"{'matrix':<48} {'shape':>12} {'rank':>5} {'bytes':>9} {'ratio':>8}  widths (bits: ranks)")
    for name, m in d["matrices"].items():
        widths = " ".join(f"{b}:{k}" for b, k in m["widths"].items())
        print(f"{name:<48} {'x'.join(map(str, m['shape'])):>12} {m['rank']:>5} {m['bytes']:>9} "
              f"{m['ratio']:>8.5f}  {widths}")
    for name, v in d["vocab"].items():
        print(f"{name:<48} {'x'.join(map(str, v['shape'])):>12} {v['rank']:>5} {v['bytes']:>9}  "
              f"compressed delta of {v['rows']} changed rows")
    if d["other_tensors"]:
        print(f"other tensors stored exactly: {', '.join(d['other_tensors'])}")
    return 0


def cmd_demo(a) -> int:
    from .demo import run_demo

    run_demo(a.workdir)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="prinmix", description="PrinMix delta compression of LLM fine-tunes")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compress", help="compress FINETUNED against BASE into a delta file")
    c.add_argument("base")
    c.add_argument("finetuned")
    c.add_argument("-o", "--output", required=True)
    c.add_argument("--ratio", default="1/16", help="1/16, 0.0625 or 16x (of the 16-bit delta)")
    c.add_argument("--method", default="prinmix", choices=["prinmix", "deltacome", "bitdelta", "lowrank"])
    c.add_argument("--calib", default=None, help="builtin (default), a .txt/.jsonl/.parquet file, or a HF dataset")
    c.add_argument("--nsamples", type=int, default=128)
    c.add_argument("--seqlen", type=int, default=2048)
    c.add_argument("--bits", default="0,2,3,4,5,6,7,8", help="candidate widths")
    c.add_argument("--fmax", type=int, default=4, help="at most this many distinct widths per matrix")
    c.add_argument("--device", default="auto", help="auto, cpu or cuda")
    c.add_argument("--batch-size", type=int, default=8)
    c.add_argument("--no-resume", action="store_true", help="ignore the partial results of an interrupted run")
    c.add_argument("--offload", metavar="DIR", default=None,
                   help="keep the calibration hidden states in memory-mapped files in DIR instead of RAM "
                        "(for models whose calibration activations do not fit in memory)")
    c.add_argument("--exact-embeddings", action="store_true",
                   help="earlier behaviour, for comparison: --ratio holds for the decoder linears only and "
                        "embedding / lm_head rows, norms and biases that differ are stored exactly")
    c.add_argument("--distill-steps", type=int, default=0,
                   help="bitdelta: Adam steps of scale distillation against the fine-tune's logits (0 = off)")
    c.set_defaults(fn=cmd_compress)

    m = sub.add_parser("merge", help="write BASE + DELTA as a standard Hugging Face checkpoint")
    m.add_argument("base")
    m.add_argument("delta")
    m.add_argument("-o", "--output", required=True)
    m.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    m.set_defaults(fn=cmd_merge)

    i = sub.add_parser("info", help="describe a delta file")
    i.add_argument("delta")
    i.add_argument("--json", action="store_true")
    i.set_defaults(fn=cmd_info)

    from .evaluate.cli_commands import add_eval_parser, add_report_parser
    from .export_lora import add_export_lora_parser
    from .serve.cli_command import add_serve_parser

    add_eval_parser(sub)
    add_report_parser(sub)
    add_export_lora_parser(sub)
    add_serve_parser(sub)

    d = sub.add_parser("demo", help="build a tiny model pair locally, compress it with every method, report")
    d.add_argument("--workdir", default=None)
    d.set_defaults(fn=cmd_demo)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except PrinmixError as e:
        print(f"prinmix: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prinmix: interrupted (rerun the same command to resume)", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `prinmix info x.delta | head`: the reader left; stop quietly
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except (OSError, SafetensorError) as e:  # read-only output, disk full, --offload on a read-only path…
        print(f"prinmix: error: {_io_error_line(e)}", file=sys.stderr)
        return 2


def _io_error_line(e: Exception) -> str:
    """One line for an I/O failure: the file (the destination of a rename) and the system's reason.
    safetensors reports write errors as SafetensorError('Error while serializing: IoError(Os {…})')."""
    if isinstance(e, OSError):
        where = e.filename2 or e.filename
        return f"{where}: {e.strerror or e}" if where else f"{e.strerror or e}"
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return f"cannot write a safetensors file: {text}"


if __name__ == "__main__":
    sys.exit(main())
