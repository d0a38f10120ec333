"""Greedy decoding with a real vLLM, run by the interpreter of a separate virtual environment that has
vllm installed (prinmix does not depend on vllm; see tests/test_vllm_integration.py, bench_vllm.py).

    python vllm_runner.py REQUEST.json RESULT.json

REQUEST: {"model": base dir, "adapters": {name: adapter dir}, "max_lora_rank": int,
          "prompts": [[token ids]…], "lora": [adapter name or null per prompt], "max_tokens": int,
          "dtype": "float32", "max_model_len": int, "repeat": int (timed runs after one warm-up)}
RESULT:  {"outputs": [{"token_ids": [...], "logprobs": [logprob of each generated token]}…],
          "seconds": [wall seconds of each timed run], "generated_tokens": int, "load_seconds": float}
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

    req = json.loads(open(request_path).read())
    adapters = req.get("adapters") or {}
    t0 = time.perf_counter()
    kwargs = dict(model=req["model"], dtype=req.get("dtype", "float32"), enforce_eager=True,
                  max_model_len=req.get("max_model_len", 256), seed=0)
    if adapters:
        kwargs.update(enable_lora=True, max_lora_rank=req["max_lora_rank"], max_loras=len(adapters),
                      max_cpu_loras=len(adapters))
    llm = LLM(**kwargs)
    load_seconds = time.perf_counter() - t0
    lora_requests = {name: LoRARequest(name, i + 1, path) for i, (name, path) in enumerate(sorted(adapters.items()))}
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in req["prompts"]]
    per_prompt = [lora_requests[n] if n is not None else None for n in req.get("lora", [None] * len(prompts))]
    params = SamplingParams(temperature=0.0, max_tokens=req["max_tokens"], logprobs=0, ignore_eos=True)

    def run():
        return llm.generate(prompts, params, lora_request=per_prompt if adapters else None, use_tqdm=False)

    outputs = run()                                                    # warm-up, and the checked outputs
    seconds = []
    for _ in range(req.get("repeat", 0)):
        t = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - t)
    result = {"outputs": [], "seconds": seconds, "load_seconds": load_seconds,
              "generated_tokens": sum(len(o.outputs[0].token_ids) for o in outputs)}
    for o in outputs:
        c = o.outputs[0]
        result["outputs"].append({"token_ids": list(c.token_ids),
                                  "logprobs": [step[t].logprob for t, step in zip(c.token_ids, c.logprobs)]})
    with open(result_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
