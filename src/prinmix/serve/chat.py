"""Chat prompts: the model's chat template; a model without one gets no invented format.

Template used for a tenant: `serve --chat-template FILE` when given, else the fine-tune's own
(chat_template.jinja or tokenizer_config.json's "chat_template" among the delta file's aux files),
else the base tokenizer's. With none of them, /v1/chat/completions answers 400: a made-up role
format would give answers the fine-tune was never trained for. transformers renders templates in
a Jinja sandbox; a template's own error (e.g. roles that must alternate) is the user's 400.
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


def chat_prompt_ids(tokenizer, messages: list[dict], template: str) -> list[int]:
    """Token ids of the conversation rendered with `template`, the generation prompt appended."""
    text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]
