"""vLLM's accepted `--max-lora-rank` values (no torch: the CLI's `--max-rank` choices come from here)."""

VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)   # vllm.config.lora.MaxLoRARanks (0.32)
