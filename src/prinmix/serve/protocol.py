"""OpenAI-shaped request bodies (pydantic), response objects and errors.

Every field a request may carry is declared here: an undeclared field is a 400 naming it, and a
declared one this server cannot honour (penalties, logit_bias, echo, suffix, best_of ≠ n) is a 400
naming it unless it has its neutral value. Nothing is accepted and then ignored, except `user`, an
end-user id OpenAI defines for the caller's own abuse tracking, which never changes an answer.
Logprobs cover every generated token up to the one that completed a stop string (the eos token,
whose text is not in the answer, is left out); a token's text is its own decoded piece.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from .sampling import SamplingParams, TokenLogprob

MAX_CHOICES = 16             # most choices (n) per request: each is a sequence in the running batch
MAX_TOP_LOGPROBS = 20        # as vLLM (OpenAI: 5 for completions, 20 for chat)
MAX_STOP_STRINGS = 16        # OpenAI: 4. The worker checks every stop string after every token, so
MAX_STOP_CHARS = 256         # their number and length are bounded: one request cannot slow the batch


class APIError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param

    def body(self) -> dict:
        return error_body(self.message, self.type, self.code, self.param)


def error_body(message: str, type: str = "invalid_request_error", code: str | None = None,
               param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_type(status: int) -> str:
    return "server_error" if status >= 500 else "invalid_request_error"


StopString = Annotated[str, Field(max_length=MAX_STOP_CHARS)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Body):
    include_usage: bool = False


class SamplingRequest(_Body):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    stop: StopString | list[StopString] | None = Field(None, max_length=MAX_STOP_STRINGS)
    temperature: float | None = Field(None, ge=0, le=2)      # None: 1 (OpenAI's default); 0: greedy
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)                   # -1 or 0: off (vLLM)
    seed: int | None = None
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def refuse_unsupported(self) -> None:
        """APIError 400 naming the first field set to a value this server cannot honour."""
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise APIError(400, f"{name} is not supported by this server (only 0)", param=name)
        if self.logit_bias:
            raise APIError(400, "logit_bias is not supported by this server", param="logit_bias")

    def sampling_params(self, logprobs: int | None) -> list[SamplingParams]:
        """One SamplingParams per choice; choice i of a seeded request uses seed + i."""
        temperature = 1.0 if self.temperature is None else self.temperature
        top_k = self.top_k if self.top_k and self.top_k > 0 else 0
        top_p = 1.0 if self.top_p is None else self.top_p
        return [SamplingParams(temperature, top_p, top_k, None if self.seed is None else self.seed + i, logprobs)
                for i in range(self.n)]


class CompletionRequest(SamplingRequest):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.echo:
            raise APIError(400, "echo is not supported by this server", param="echo")
        if self.suffix:
            raise APIError(400, "suffix is not supported by this server", param="suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise APIError(400, "best_of is not supported by this server (only best_of = n)", param="best_of")


class TextPart(_Body):
    type: Literal["text"] = "text"
    text: str = ""


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def as_dict(self) -> dict:
        content = self.content if isinstance(self.content, str) or self.content is None \
            else "".join(p.text for p in self.content)
        message = {"role": self.role, "content": content or ""}
        return {**message, "name": self.name} if self.name is not None else message


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")

    def logprob_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class LoadAdapterRequest(_Body):
    lora_name: str = Field(min_length=1, max_length=128)
    lora_path: str = Field(min_length=1, max_length=4096)


class UnloadAdapterRequest(_Body):
    lora_name: str = Field(min_length=1, max_length=128)


# ---- responses ------------------------------------------------------------------------------------

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_logprobs(entries: list[TokenLogprob], token_text: Callable[[int], str], offset: int) -> dict:
    """A completion choice's `logprobs` object; offset: characters of the choice's text before these tokens."""
    texts = [token_text(e.token) for e in entries]
    starts = [offset + sum(len(t) for t in texts[:i]) for i in range(len(texts))]
    return {"tokens": texts, "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{token_text(t): lp for t, lp in e.top} for e in entries], "text_offset": starts}


def chat_logprobs(entries: list[TokenLogprob], token_text: Callable[[int], str]) -> dict:
    """A chat choice's `logprobs` object: {"content": [{token, logprob, bytes, top_logprobs}]}."""
    def item(token: int, logprob: float) -> dict:
        text = token_text(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {"content": [{**item(e.token, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]}
                        for e in entries]}


def completion_choice(index: int, text: str, finish_reason: str | None, logprobs: dict | None = None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def completion(rid: str, model: str, choices: list[dict], use: dict | None, chunk: bool = False) -> dict:
    """A text_completion object (or one streamed chunk of it: use=None)."""
    body = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model, "choices": choices}
    if not chunk or use is not None:
        body["usage"] = use
    return body


def chat_choice(index: int, text: str, finish_reason: str | None, logprobs: dict | None = None) -> dict:
    return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
            "finish_reason": finish_reason}


def chat_completion(rid: str, model: str, choices: list[dict], use: dict) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": use}


def chat_chunk(rid: str, model: str, delta: dict | None, finish_reason: str | None = None,
               use: dict | None = None, index: int = 0, logprobs: dict | None = None) -> dict:
    """One chat.completion.chunk; delta=None gives the usage-only chunk (no choices)."""
    choices = [] if delta is None else [{"index": index, "delta": delta, "logprobs": logprobs,
                                         "finish_reason": finish_reason}]
    body = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": choices}
    if use is not None:
        body["usage"] = use
    return body
