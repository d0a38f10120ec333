"""A synthetic Qwen2.5-7B-shaped base / fine-tune pair and its PrinMix delta, for serving benchmarks on
a machine without the real checkpoints (no network needed).

Qwen2.5-7B's layer shapes (hidden 3584, MLP 18944, 28 query / 4 key-value heads of 128, q/k/v biases,
untied lm_head) with --layers decoder layers and a --vocab rows embedding (32768 by default: the real
152064 would make the embedding and lm_head dominate a 2-layer model); random weights (std 0.02).
The fine-tune adds to every linear weight a synthetic update (RMS 1 % of the weights') of realistic rank structure
(bench_kernels.synthetic_delta: rank-64 part with a decaying spectrum plus noise), so its delta is
linears only. The tokenizer is the tiny byte-level BPE of prinmix.tiny_models (calibration
text only needs ids below 512). Writes DIR/base, DIR/finetuned and DIR/delta.prinmix.

    python benchmarks/synthetic_qwen.py DIR [--layers 2] [--smoke]      # --smoke: shapes / 32, 1 layer
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Qwen2Config

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import synthetic_delta  # noqa: E402

from prinmix import api  # noqa: E402
from prinmix.tiny_models import train_tokenizer  # noqa: E402


def qwen7b_config(layers: int, vocab: int, scale: int) -> Qwen2Config:
    return Qwen2Config(vocab_size=vocab, hidden_size=3584 // scale, intermediate_size=18944 // scale,
                       num_hidden_layers=layers, num_attention_heads=28 // min(scale, 4),
                       num_key_value_heads=4 // min(scale, 4), max_position_embeddings=4096,
                       tie_word_embeddings=False, rope_theta=1e6, rms_norm_eps=1e-6)


def build(out: Path, layers: int, vocab: int, scale: int, device: str, nsamples: int = 8, seqlen: int = 128) -> Path:
    """Write base/, finetuned/ and delta.prinmix under `out` (kept when present); returns the delta path."""
    delta = out / "delta.prinmix"
    if delta.exists():
        return delta
    t0 = time.perf_counter()
    tokenizer = train_tokenizer(out / "tokenizer")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(qwen7b_config(layers, vocab, scale), dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0, 0.02)
        model.to(torch.bfloat16).save_pretrained(out / "base")
        tokenizer.save_pretrained(out / "base")
        for i, (name, p) in enumerate(model.named_parameters()):
            if p.ndim == 2 and "embed" not in name and "lm_head" not in name:
                p += 0.2 * synthetic_delta(p.shape[0], p.shape[1], i, "cpu")      # RMS 2e-4: 1 % of the weights
        model.to(torch.bfloat16).save_pretrained(out / "finetuned")
        tokenizer.save_pretrained(out / "finetuned")
    print(f"synthetic pair written in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    t0 = time.perf_counter()
    api.compress(out / "base", out / "finetuned", delta, ratio="1/16", method="prinmix", nsamples=nsamples,
                 seqlen=seqlen, device=device)
    print(f"compressed (PrinMix 1/16, {layers} layers) in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return delta


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--smoke", action="store_true", help="shapes / 32, 1 layer, vocab 1024, 4 calibration windows")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.smoke:
        print(build(Path(args.out), 1, 1024, 32, args.device, nsamples=4, seqlen=64))
    else:
        print(build(Path(args.out), args.layers, args.vocab, 1, args.device))
    return 0


if __name__ == "__main__":
    sys.exit(main())
