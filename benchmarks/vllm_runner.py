"""Greedy decoding with a real vLLM, run by the interpreter of a separate virtual environment that has
vllm installed (prinmix does not depend on vllm; see tests/export/test_vllm_integration.py, bench_vllm.py).

    python vllm_runner.py REQUEST.json RESULT.json

REQUEST: {"model": base dir, "adapters": {name: adapter dir}, "max_lora_rank": int,
          "prompts": [[token ids]…], "max_tokens": int, "dtype": "float32", "max_model_len": int,
          "max_num_batched_tokens": int, "max_num_seqs": int (optional scheduler limits),
          "runs": [{"name": str, "lora": [adapter name or null per prompt], "repeat": int,
                    "warmup": bool (default true; false: the first run is timed too)}…]}
          (or one run given by top-level "lora" / "repeat")
RESULT:  {"load_seconds": float, "runs": {name: {"outputs": [{"token_ids": [...], "logprobs": [logprob of
          each generated token]}…], "seconds": [wall seconds of each timed run after one warm-up run],
          "generated_tokens": int}}, and the first run's "outputs" at the top level
Greedy (temperature 0), fp32, enforce_eager (no CUDA graphs / torch.compile warm-up); the CPU KV cache
size comes from VLLM_CPU_KVCACHE_SPACE (GiB) in the environment.
"""

from __future__ import annotations

import json
import sys
import time


def main(request_path: str, result_path: str) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    with open(request_path) as f:
        req = json.load(f)
    adapters = req.get("adapters") or {}
    t0 = time.perf_counter()
    kwargs = {"model": req["model"], "dtype": req.get("dtype", "float32"), "enforce_eager": True,
              "max_model_len": req.get("max_model_len", 256), "seed": 0}
    for key in ("max_num_batched_tokens", "max_num_seqs"):   # scheduler limits, when the request sets them
        if req.get(key):
            kwargs[key] = req[key]
    if adapters:
        kwargs.update(enable_lora=True, max_lora_rank=req["max_lora_rank"], max_loras=len(adapters),
                      max_cpu_loras=len(adapters))
    llm = LLM(**kwargs)
    load_seconds = time.perf_counter() - t0
    lora_requests = {name: LoRARequest(name, i + 1, path) for i, (name, path) in enumerate(sorted(adapters.items()))}
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in req["prompts"]]
    params = SamplingParams(temperature=0.0, max_tokens=req["max_tokens"], logprobs=0, ignore_eos=True)
    runs = req.get("runs") or [{"name": "run", "lora": req.get("lora"), "repeat": req.get("repeat", 0)}]
    result = {"load_seconds": load_seconds, "runs": {}}
    for spec in runs:
        names = spec.get("lora") or [None] * len(prompts)
        per_prompt = [lora_requests[n] if n is not None else None for n in names] if adapters else None
        t = time.perf_counter()
        outputs = llm.generate(prompts, params, lora_request=per_prompt, use_tqdm=False)   # warm-up, and checked
        seconds = [] if spec.get("warmup", True) else [time.perf_counter() - t]
        for _ in range(spec.get("repeat", 0)):
            t = time.perf_counter()
            llm.generate(prompts, params, lora_request=per_prompt, use_tqdm=False)
            seconds.append(time.perf_counter() - t)
        result["runs"][spec["name"]] = {
            "seconds": seconds, "generated_tokens": sum(len(o.outputs[0].token_ids) for o in outputs),
            "outputs": [{"token_ids": list(o.outputs[0].token_ids),
                         "logprobs": [step[t].logprob for t, step in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)]}
                        for o in outputs]}
    result["outputs"] = result["runs"][runs[0]["name"]]["outputs"]
    with open(result_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
