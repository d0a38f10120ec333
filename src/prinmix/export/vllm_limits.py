"""vLLM's accepted `--max-lora-rank` values (no torch: the CLI's `--max-rank` choices come from here)."""

VLLM_MAX_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
