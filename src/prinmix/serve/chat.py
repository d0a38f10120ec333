"""Chat prompts: the model's chat template, or a plain fallback when there is none.

Template used for a tenant: the fine-tune's own (chat_template.jinja or tokenizer_config.json's
"chat_template" among the delta file's aux files), else the base tokenizer's. Without any template
the prompt is one line per message, "{role}: {content}", followed by "assistant:" (the model
continues from there), tokenized with the tokenizer's special tokens (e.g. BOS).
"""

from __future__ import annotations

import json

from safetensors import safe_open


def delta_chat_template(delta_path) -> str | None:
    """The chat template the fine-tune shipped with, read from the delta file's aux files (None if none)."""
    try:
        with safe_open(str(delta_path), framework="pt") as f:
            keys = set(f.keys())

            def text(name: str) -> str | None:
                key = f"aux/{name}"
                return bytes(f.get_tensor(key).numpy()).decode("utf-8") if key in keys else None

            jinja = text("chat_template.jinja")
            config = text("tokenizer_config.json")
    except Exception:                         # noqa: BLE001 - a template is optional; add_tenant validates files
        return None
    if jinja:
        return jinja
    template = json.loads(config).get("chat_template") if config else None
    if isinstance(template, list):            # named templates: [{"name": ..., "template": ...}]
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return template if isinstance(template, str) else None


def fallback_chat_prompt(messages: list[dict]) -> str:
    """One "{role}: {content}" line per message, then "assistant:"."""
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


def chat_prompt_ids(tokenizer, messages: list[dict], template: str | None) -> list[int]:
    """Token ids of the conversation with the generation prompt appended (template or fallback)."""
    template = template or getattr(tokenizer, "chat_template", None)
    if template:
        text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(fallback_chat_prompt(messages))["input_ids"]
