"""Memory (and time) of the sequential compressor (`prinmix.pipeline.compress`) at Llama-70B layer shapes, on a 2–3-layer synthetic pair.

    python benchmarks/bench_memory.py build --out /work/pairs/l70-shapes --layers 2
    python benchmarks/bench_memory.py run --pair /work/pairs/l70-shapes [--compressor bitdelta] [--offload]
    python benchmarks/bench_memory.py fit [--scales 16 8]          # PrinMix's per-matrix cost at 1/s scale
    python benchmarks/bench_memory.py table --pair /work/pairs/l70-shapes

build: a Llama config with 70B shapes (hidden 8192, intermediate 28672, 64 heads / 8 KV heads, head
dim 128, vocabulary 128256) but only --layers decoder layers; a random bf16 base (std 0.02, norms 1)
and a fine-tune = base + (low-rank rank-64 + noise) delta on every linear, plus small changes to the
norms; embeddings and lm_head unchanged. Written as sharded safetensors (≤ 2 GB per shard, with an
index) with a small BPE tokenizer trained on the built-in text.

run: the sequential compressor (prinmix.pipeline.compress; method prinmix, calibrated: Hessians H = XXᵀ captured per layer, float32 on the
device) in a child process, whose RSS and RssAnon (/proc) the parent samples every 0.2 s; the child is
killed when RssAnon passes --max-rss GiB (default: 85 % of MemAvailable at start) so that a run too big
for the machine fails alone. --compressor {prinmix,lowrank,bitdelta} picks what compresses each
matrix: anything but prinmix measures the *pipeline* (streamed layers, Hessians, propagation, the
delta) with a cheap per-matrix step, because PrinMix itself at these shapes takes hours per matrix on
a CPU (see fit). Results go to <pair>/results.json.

fit: PrinMix's compress_matrix on the layer's distinct matrix shapes scaled down by 1/s (each in a
child process: peak RSS increase and seconds), extrapolated to full size per shape with the power law
through its two largest measurements (memory should approach x², time x²–x³: the k = 7 stacked
width simulations of V [r, h_in] and GPTQ's H [h_in, h_in] chain and column sweeps).

table: one layer's and the 80-layer model's size, the measured peaks and per-layer times, and the
predicted peak and time of PrinMix on all 80 layers (pipeline peak + the largest per-matrix PrinMix
peak (the compressed delta is memory-mapped from the per-layer part files, file-backed); time 80 × (pipeline + Σ PrinMix matrices)).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

SCALE = int(os.environ.get("PRINMIX_BENCH_SCALE", "1"))  # > 1 only to smoke-test this script on small shapes
HIDDEN, INTER, HEADS, KV_HEADS, VOCAB, FULL_LAYERS = 8192 // SCALE, 28672 // SCALE, 64, 8, 128256 // SCALE, 80
HEAD_DIM = HIDDEN // HEADS
LINEARS = {  # name: (out, in)
    "self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (KV_HEADS * HEAD_DIM, HIDDEN),
    "self_attn.v_proj": (KV_HEADS * HEAD_DIM, HIDDEN), "self_attn.o_proj": (HIDDEN, HIDDEN),
    "mlp.gate_proj": (INTER, HIDDEN), "mlp.up_proj": (INTER, HIDDEN), "mlp.down_proj": (HIDDEN, INTER),
}
SHARD_BYTES = 2 * 1024 ** 3
GiB = 1024 ** 3


# ----------------------------------------------------------------------------------------------- build
def _config(layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=layers,
                       num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=131072,
                       rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1,
                       eos_token_id=2, pad_token_id=0, dtype="bfloat16", architectures=["LlamaForCausalLM"])


def _tokenizer(directory: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from prinmix.calibration.data import builtin_text

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2000, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(builtin_text()[:300_000].splitlines(), trainer=trainer)
    PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                            model_max_length=131072).save_pretrained(directory)


def _tensors(layers: int):
    """(name, shape, kind) in file order; kind: 'embed', 'linear' or 'norm'."""
    yield "model.embed_tokens.weight", (VOCAB, HIDDEN), "embed"
    for i in range(layers):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", (HIDDEN,), "norm"
        for name, shape in LINEARS.items():
            yield p + name + ".weight", shape, "linear"
        yield p + "post_attention_layernorm.weight", (HIDDEN,), "norm"
    yield "model.norm.weight", (HIDDEN,), "norm"
    yield "lm_head.weight", (VOCAB, HIDDEN), "embed"


class _ShardWriter:
    def __init__(self, directory: Path) -> None:
        self.directory, self.shard, self.size, self.files, self.index = directory, {}, 0, [], {}

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.shard and self.size + nbytes > SHARD_BYTES:
            self.flush()
        self.shard[name], self.size = tensor, self.size + nbytes

    def flush(self) -> None:
        from safetensors.torch import save_file

        if self.shard:
            fname = f"model-{len(self.files) + 1:05d}.safetensors"
            save_file(self.shard, str(self.directory / fname), metadata={"format": "pt"})
            self.files.append(fname)
            self.index.update({n: fname for n in self.shard})
            self.shard, self.size = {}, 0

    def close(self) -> None:
        self.flush()
        total = sum((self.directory / f).stat().st_size for f in self.files)
        n = len(self.files)
        renamed = {f: f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k, f in enumerate(self.files)}
        for old, new in renamed.items():
            (self.directory / old).rename(self.directory / new)
        (self.directory / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": {k: renamed[v] for k, v in self.index.items()}}, indent=1))


def build(out: Path, layers: int, seed: int = 0, rank: int = 64) -> None:
    """Write out/base and out/finetuned (see the module docstring)."""
    out.mkdir(parents=True, exist_ok=True)
    config = _config(layers)
    writers = {}
    for role in ("base", "finetuned"):
        (out / role).mkdir(exist_ok=True)
        config.save_pretrained(out / role)
        _tokenizer(out / role)
        writers[role] = _ShardWriter(out / role)
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    for name, shape, kind in _tensors(layers):
        if kind == "norm":
            base = torch.ones(shape)
            ft = base + 1e-3 * torch.randn(shape, generator=g)
        else:
            base = torch.randn(shape, generator=g).mul_(0.02).to(torch.bfloat16).float()
            ft = base
            if kind == "linear":  # low rank (entries ~4e-4) + noise (1e-4): about 2 % of ‖W‖
                left = torch.randn(shape[0], rank, generator=g).mul_(4e-4 / rank ** 0.5)
                ft = base + left @ torch.randn(rank, shape[1], generator=g)
                ft.add_(torch.randn(shape, generator=g), alpha=1e-4)
        writers["base"].add(name, base.to(torch.bfloat16))
        writers["finetuned"].add(name, ft.to(torch.bfloat16))
        del base, ft
        print(f"  {name} {list(shape)}  ({time.time() - t0:.0f} s)", flush=True)
    for w in writers.values():
        w.close()
    (out / "build_info.json").write_text(json.dumps({"layers": layers, "seed": seed, "rank": rank}))


# ----------------------------------------------------------------------------------------------- run
def _status_kib(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile"):
                    out[key] = int(value.split()[0])
    except FileNotFoundError:
        pass
    return out


def _mem_available_gib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024 ** 2
    return 0.0


class _Phases:
    """In-process RssAnon sampler; event(name) prints a JSON line with the RssAnon now and its peak since the
    previous event (so each phase of the pipeline gets its own peak)."""

    def __init__(self) -> None:
        self.t0, self.peak, self.pid = time.time(), 0, os.getpid()
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, _status_kib(self.pid).get("RssAnon", 0))
            time.sleep(0.05)

    def event(self, name: str, **extra) -> None:
        now = _status_kib(self.pid).get("RssAnon", 0)
        print(json.dumps({"event": name, "t": round(time.time() - self.t0, 2), "anon_gib": now / 1024 ** 2,
                          "peak_gib": max(self.peak, now) / 1024 ** 2, **extra}), flush=True)
        self.peak = 0


def _child_compress(args) -> None:
    """In the child: the sequential compressor with the chosen per-matrix compressor; its phase events and
    layer progress as JSON lines (a listener of prinmix.pipeline.events)."""
    from prinmix.algorithms.compress_matrix import compress_matrix
    from prinmix.pipeline.compress import run_compress
    from prinmix.pipeline.config import CalibrationConfig, CompressJob
    from prinmix.pipeline.events import LayerDone, PhaseDone, PhaseStarted

    phases = _Phases()
    compressor = args.compressor
    t0 = time.time()

    def per_matrix(d, H, ratio, method, cfg):
        # the pipeline passes PrinMix's ratio less the matrix's header reserve; BitDelta's size is fixed at 1/16
        return compress_matrix(d, H, max(ratio, 1 / 16) if compressor == "bitdelta" else ratio, compressor, cfg)

    def listener(event) -> None:
        if isinstance(event, (PhaseStarted, PhaseDone)):
            extra = {"shape": event.detail["shape"]} if "shape" in event.detail else {}
            phases.event(f"{event.phase.value} {'start' if isinstance(event, PhaseStarted) else 'done'}", **extra)
        elif isinstance(event, LayerDone):
            phases.event("layer done", layer=event.layer + 1)
            print(json.dumps({"layer_done": event.layer + 1, "t": time.time() - t0}), flush=True)

    job = CompressJob.create(args.pair / "base", args.pair / "finetuned", args.out, "1/16", "prinmix",
                             calibration=CalibrationConfig(nsamples=args.nsamples, seqlen=args.seqlen,
                                                           batch_size=args.batch_size, offload=args.offload_dir))
    s = run_compress(job, torch.device("cpu"), resume=False, listeners=[listener], matrix_compressor=per_matrix)
    print(json.dumps({"done": True, "seconds": s.seconds, "file_bytes": s.file_bytes, "linear_bytes": s.linear_bytes,
                      "ru_maxrss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2}), flush=True)


def _monitor(cmd: list[str], max_rss_gib: float, log) -> dict:
    """Run cmd, sampling its memory; kill it past max_rss_gib of RssAnon. Returns peaks and its JSON lines."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peaks = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
    timeline, killed, stop = [], [False], threading.Event()
    t0 = time.time()

    def sample():
        while not stop.is_set():
            s = _status_kib(proc.pid)
            for k, v in s.items():
                peaks[k] = max(peaks[k], v)
            if s:
                timeline.append((round(time.time() - t0, 1), s.get("RssAnon", 0), s.get("VmRSS", 0)))
            if s.get("RssAnon", 0) > max_rss_gib * 1024 ** 2:
                killed[0] = True
                proc.kill()
            stop.wait(0.2)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    lines = []
    for line in proc.stdout:
        log.write(line)
        log.flush()
        if line.startswith("{"):
            try:
                lines.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    proc.wait()
    stop.set()
    thread.join()
    return {"returncode": proc.returncode, "killed_over_gib": max_rss_gib if killed[0] else None,
            "peak_rss_gib": peaks["VmRSS"] / 1024 ** 2, "peak_anon_gib": peaks["RssAnon"] / 1024 ** 2,
            "peak_file_gib": peaks["RssFile"] / 1024 ** 2, "wall_s": time.time() - t0, "events": lines,
            "timeline": timeline[:: max(1, len(timeline) // 400)]}


def run(args) -> dict:
    max_rss = args.max_rss or 0.85 * _mem_available_gib()
    tag = f"{args.compressor}{'-offload' if args.offload else ''}-{args.nsamples}x{args.seqlen}"
    out = args.pair / f"{tag}.delta"
    cmd = [sys.executable, __file__, "_compress", "--pair", str(args.pair), "--out", str(out), "--compressor",
           args.compressor, "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
           "--batch-size", str(args.batch_size)]
    if args.offload:
        cmd += ["--offload-dir", str(args.pair / "offload")]
    print(f"run {tag}: RssAnon limit {max_rss:.1f} GiB", flush=True)
    with open(args.pair / f"{tag}.log", "w") as log:
        result = _monitor(cmd, max_rss, log)
    result.update(tag=tag, compressor=args.compressor, offload=args.offload, nsamples=args.nsamples,
                  seqlen=args.seqlen)
    layer_t = [e["t"] for e in result["events"] if "layer_done" in e]
    result["layer_seconds"] = [b - a for a, b in zip([0.0] + layer_t, layer_t)]
    done = next((e for e in result["events"] if e.get("done")), None)
    result["summary"] = done
    results_file = args.pair / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    results[tag] = result
    results_file.write_text(json.dumps(results, indent=1))
    print(f"  -> rc {result['returncode']}, peak RSS {result['peak_rss_gib']:.2f} GiB "
          f"(anon {result['peak_anon_gib']:.2f}), {result['wall_s']:.0f} s", flush=True)
    if out.exists():
        out.unlink()
    return result


# ----------------------------------------------------------------------------------------------- fit
def _child_matrix(args) -> None:
    """In the child: PrinMix compress_matrix on one random low-rank-plus-noise matrix; peak RSS increase, seconds."""
    from prinmix.algorithms import width_simulation
    from prinmix.algorithms.compress_matrix import compress_matrix

    # the width simulation's memory cap scales with the matrix (÷ s²), so chunking splits the stacked rows at
    # 1/s scale exactly as it will at full size
    width_simulation.SIM_CHUNK_BYTES = max(1, width_simulation.SIM_CHUNK_BYTES // args.scale ** 2)
    torch.manual_seed(0)
    h_out, h_in = args.shape
    delta = torch.randn(h_out, 64) @ torch.randn(64, h_in) * 1e-4 + 1e-5 * torch.randn(h_out, h_in)
    x = torch.randn(512, h_in)
    H = x.T @ x
    del x
    before = _status_kib(os.getpid())["RssAnon"]
    peak = [before]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _status_kib(os.getpid()).get("RssAnon", 0))
            stop.wait(0.05)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    t0 = time.time()
    compress_matrix(delta, H, 1 / 16, "prinmix")
    seconds = time.time() - t0
    stop.set()
    thread.join()
    print(json.dumps({"shape": [h_out, h_in], "seconds": seconds, "extra_gib": (peak[0] - before) / 1024 ** 2}))


def fit(args) -> dict:
    """Measure PrinMix per matrix at 1/s scale for each s in args.scales; extrapolate each shape to full size
    with the power law through its two largest measurements (exponents reported)."""
    import math

    shapes = sorted(set(LINEARS.values()))
    points = []
    for s in sorted(args.scales, reverse=True):
        for h_out, h_in in shapes:
            shape = (h_out // s, h_in // s)
            cmd = [sys.executable, __file__, "_matrix", "--shape", str(shape[0]), str(shape[1]), "--scale", str(s)]
            res = subprocess.run(cmd, capture_output=True, text=True, check=True)
            point = json.loads(res.stdout.strip().splitlines()[-1])
            point.update(scale=s, full=[h_out, h_in])
            points.append(point)
            print(f"  1/{s}: {shape[0]}x{shape[1]}  {point['seconds']:.1f} s  +{point['extra_gib']:.3f} GiB", flush=True)
    full = {}
    for name, (o, i) in LINEARS.items():
        mine = sorted((p for p in points if p["full"] == [o, i]), key=lambda p: -p["scale"])
        small, big = mine[-2], mine[-1]
        step = math.log(small["scale"] / big["scale"])
        est = {}
        for key in ("seconds", "extra_gib"):
            a, b = max(small[key], 1e-6), max(big[key], 1e-6)
            exponent = math.log(b / a) / step
            est[key] = (b * big["scale"] ** exponent, exponent)
        full[name] = {"shape": [o, i], "seconds": est["seconds"][0], "time_exponent": est["seconds"][1],
                      "peak_gib": est["extra_gib"][0], "mem_exponent": est["extra_gib"][1]}
    result = {"points": points, "full": full}
    (Path(args.out) if args.out else Path("prinmix_fit.json")).write_text(json.dumps(result, indent=1))
    for name, f in full.items():
        print(f"  {name:<18} {f['shape']}  ~{f['peak_gib']:.1f} GiB (x^{f['mem_exponent']:.2f})  "
              f"~{f['seconds'] / 3600:.2f} h (x^{f['time_exponent']:.2f})", flush=True)
    return result


# ----------------------------------------------------------------------------------------------- table
def _phase_peaks(events: list[dict]) -> dict:
    """{phase: max RssAnon GiB} over the run: embed, capture (layer state + Hessians), compress
    (per matrix shape: RssAnon at its start and peak), propagate, and the rest."""
    out = {"embed": 0.0, "capture": 0.0, "propagate": 0.0, "compress_start": {}, "compress_peak": {}}
    for e in events:
        name = e.get("event", "")
        if name in ("embed done", "capture done", "propagate done"):
            key = name.split()[0]
            out[key] = max(out[key], e["peak_gib"])
        elif name == "compress start":
            shape = "x".join(map(str, e["shape"]))
            out["compress_start"][shape] = max(out["compress_start"].get(shape, 0.0), e["anon_gib"])
        elif name == "compress done":
            shape = "x".join(map(str, e["shape"]))
            out["compress_peak"][shape] = max(out["compress_peak"].get(shape, 0.0), e["peak_gib"])
    return out


def table(pair: Path, fit_file: Path | None) -> None:
    results = json.loads((pair / "results.json").read_text())
    layers = json.loads((pair / "build_info.json").read_text())["layers"]
    layer_params = sum(o * i for o, i in LINEARS.values()) + 2 * HIDDEN
    embed_params = 2 * VOCAB * HIDDEN + HIDDEN
    layer_gib = 2 * layer_params / GiB
    model_gib = 2 * (FULL_LAYERS * layer_params + embed_params) / GiB
    print(f"\nLlama-70B shapes: one layer {layer_params / 1e9:.3f} B params = {layer_gib:.2f} GiB bf16 "
          f"({4 * layer_params / GiB:.2f} GiB float32); 80 layers + embeddings/lm_head "
          f"{(FULL_LAYERS * layer_params + embed_params) / 1e9:.1f} B = {model_gib:.1f} GiB bf16; this pair: {layers} layers\n")
    print(f"{'run':<30} {'peak RSS':>9} {'anon':>7} {'file':>7} {'anon/layer':>10} {'s/layer':>8} {'status':>7}")
    for tag, r in results.items():
        per_layer = sum(r["layer_seconds"]) / len(r["layer_seconds"]) if r["layer_seconds"] else float("nan")
        status = "ok" if r["returncode"] == 0 else ("killed" if r["killed_over_gib"] else f"rc {r['returncode']}")
        print(f"{tag:<30} {r['peak_rss_gib']:>8.2f}G {r['peak_anon_gib']:>6.2f}G {r['peak_file_gib']:>6.2f}G "
              f"{r['peak_anon_gib'] / layer_gib:>10.2f} {per_layer:>8.0f} {status:>7}")
    for tag, r in results.items():
        ph = _phase_peaks(r["events"])
        if not ph["capture"]:
            continue
        print(f"\n{tag}: RssAnon peak per phase (GiB): embed {ph['embed']:.2f}, capture {ph['capture']:.2f}, "
              f"propagate {ph['propagate']:.2f}; compress ({r['compressor']}) start/peak: "
              + ", ".join(f"{k} {ph['compress_start'][k]:.2f}/{ph['compress_peak'].get(k, 0):.2f}"
                          for k in ph["compress_start"]))
    if not (fit_file and fit_file.exists()):
        return
    fitted = json.loads(fit_file.read_text())
    fit = fitted["full"]
    for name, v in fit.items():  # upper bounds: memory x², time x³ (GPTQ's r·h_in² sweeps) from the largest point
        big = min((p for p in fitted["points"] if p["full"] == v["shape"]), key=lambda p: p["scale"])
        v["peak_gib_x2"] = big["extra_gib"] * big["scale"] ** 2
        v["seconds_x3"] = big["seconds"] * big["scale"] ** 3
    print("\nPrinMix compress_matrix per matrix, measured at 1/s scale and extrapolated to full size "
          "(power law through the two largest points .. upper bound x² memory / x³ time):")
    for n, v in fit.items():
        print(f"  {n:<18} {v['shape'][0]:>5}x{v['shape'][1]:<5} +{v['peak_gib']:.1f}..{v['peak_gib_x2']:.1f} GiB   "
              f"{v['seconds'] / 3600:.2f}..{v['seconds_x3'] / 3600:.2f} h")
    ok = [r for r in results.values() if r["returncode"] == 0 and r["compressor"] != "prinmix" and r["events"]]
    if not ok:
        return
    r = min(ok, key=lambda r: r["peak_anon_gib"])
    ph = _phase_peaks(r["events"])
    compress_peak = max(ph["compress_start"].get("x".join(map(str, v["shape"])), 0.0) + v["peak_gib_x2"]
                        for v in fit.values())
    delta_gib = FULL_LAYERS * layer_params * 2 / 16 / GiB          # the 1/16 delta, memory-mapped until written
    pipeline_s = sum(r["layer_seconds"]) / len(r["layer_seconds"])
    compress_s = sum(e["t"] for e in r["events"] if e.get("event") == "compress done") \
        - sum(e["t"] for e in r["events"] if e.get("event") == "compress start")
    pipeline_s -= compress_s / len(r["layer_seconds"])
    hours = FULL_LAYERS * (pipeline_s + sum(v["seconds"] for v in fit.values())) / 3600
    hours_x3 = FULL_LAYERS * (pipeline_s + sum(v["seconds_x3"] for v in fit.values())) / 3600
    peak = max(ph["embed"], ph["capture"], ph["propagate"], compress_peak)
    print(f"\nPredicted, all 80 layers with PrinMix on this machine ({r['tag']} pipeline): per-layer peak "
          f"max(embed {ph['embed']:.1f}, capture {ph['capture']:.1f}, compress {compress_peak:.1f}) = {peak:.1f} GiB, "
          f"anonymous memory; the compressed delta ({delta_gib:.1f} GiB at 1/16) is memory-mapped from its "
          f"per-layer part files until written (file-backed, reclaimable page cache, not RssAnon); "
          f"time 80 x ({pipeline_s:.0f} s pipeline + {sum(v['seconds'] for v in fit.values()) / 3600:.1f}.."
          f"{sum(v['seconds_x3'] for v in fit.values()) / 3600:.1f} h PrinMix) = {hours:.0f}..{hours_x3:.0f} h "
          f"on {os.cpu_count()} CPU cores")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--out", type=Path, required=True)
    b.add_argument("--layers", type=int, default=2)
    b.add_argument("--seed", type=int, default=0)
    for name in ("run", "_compress"):
        r = sub.add_parser(name)
        r.add_argument("--pair", type=Path, required=True)
        r.add_argument("--compressor", choices=("prinmix", "lowrank", "bitdelta"), default="bitdelta")
        r.add_argument("--nsamples", type=int, default=4)
        r.add_argument("--seqlen", type=int, default=128)
        r.add_argument("--batch-size", type=int, default=4)
        r.add_argument("--offload", action="store_true")
        r.add_argument("--max-rss", type=float, default=None, help="GiB of RssAnon before the child is killed")
        r.add_argument("--out", type=Path)
        r.add_argument("--offload-dir", type=Path)
    f = sub.add_parser("fit")
    f.add_argument("--scales", type=int, nargs="+", default=[16, 8])
    f.add_argument("--out", type=Path)
    m = sub.add_parser("_matrix")
    m.add_argument("--shape", type=int, nargs=2)
    m.add_argument("--scale", type=int, default=1, help="the 1/s scale of this shape (sizes the simulation chunks)")
    t = sub.add_parser("table")
    t.add_argument("--pair", type=Path, required=True)
    t.add_argument("--fit", type=Path)
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    if args.cmd == "build":
        build(args.out, args.layers, args.seed)
    elif args.cmd == "run":
        run(args)
    elif args.cmd == "_compress":
        _child_compress(args)
    elif args.cmd == "fit":
        fit(args)
    elif args.cmd == "_matrix":
        _child_matrix(args)
    else:
        table(args.pair, args.fit)


if __name__ == "__main__":
    main()
