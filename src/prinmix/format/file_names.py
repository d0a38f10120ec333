"""Which file names a delta file may carry for its config/tokenizer files (`aux/<name>`, `aux_from_base`).

A name is one plain path component: it starts with a letter, digit or underscore, continues with
letters, digits and `._+-` (no `/`, `\\`, NUL, no leading dot, so no `..` and no absolute path), is at
most 200 characters long, and ends with one of AUX_SUFFIXES. That is every file Hugging Face keeps
beside the weights of a causal LM — config.json, generation_config.json, tokenizer.json,
tokenizer_config.json, special_tokens_map.json, added_tokens.json, vocab.json, merges.txt,
tokenizer.model, spiece.model, chat_template.jinja, qwen.tiktoken — all at the top level of the model
directory (transformers' save_pretrained writes no tokenizer subfolders), which is also the only
place `CheckpointReader.aux_files` collects them from. merge writes them into its output directory
by that name, so the rule is what keeps a crafted delta from writing or reading outside it.
"""

from __future__ import annotations

import re

AUX_SUFFIXES = (".json", ".jinja", ".model", ".txt", ".tiktoken")
AUX_NAME_MAX_CHARS = 200
_AUX_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+-]*")


def aux_name_problem(name) -> str | None:
    """Why `name` is not an allowed config/tokenizer file name (see the module docstring), or None."""
    if not isinstance(name, str):
        return f"file name {name!r} is not a string"
    if len(name) > AUX_NAME_MAX_CHARS:
        return f"file name {name[:40]!r}… is longer than {AUX_NAME_MAX_CHARS} characters"
    if not _AUX_NAME.fullmatch(name):
        return f"file name {name!r} is not a plain file name (letters, digits, ._+-; no path)"
    if not name.endswith(AUX_SUFFIXES):
        return f"file name {name!r} is not a config/tokenizer file ({', '.join(AUX_SUFFIXES)})"
    if name.endswith(".index.json"):
        return f"file name {name!r} is a weight index (merge writes its own)"
    return None
