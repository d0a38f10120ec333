"""OpenAI-compatible HTTP server over one base model and its delta tenants (FastAPI).

    GET  /v1/models                 the base and every tenant ("parent" = the base for tenants)
    POST /v1/completions            prompt: a string or token ids (one prompt per request)
    POST /v1/chat/completions       messages rendered with the chat template (see serve/chat.py)
    POST /v1/load_lora_adapter      {"lora_name", "lora_path"}: register a delta file as a tenant (as vLLM)
    POST /v1/unload_lora_adapter    {"lora_name"}: remove an idle tenant (409 while it has requests)
    GET  /health, GET /stats        liveness; the scheduler's counters

`model` names a tenant or the base. Both generation endpoints stream with `stream: true` (server-sent
events `data: {...}`, ending with `data: [DONE]`). Decoding is greedy whatever `temperature` says;
`max_tokens`, `stop` (strings) and `stream_options.include_usage` are honoured; `n` must be 1.
Errors are OpenAI-shaped: {"error": {"message", "type", "param", "code"}} (unknown model 404
model_not_found; malformed JSON, invalid fields and prompts over --max-model-len 400).
"""

from __future__ import annotations

import asyncio
import json
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator, Callable

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from transformers import AutoTokenizer

from ..errors import PrinmixError
from ..runtime.multi_tenant import MultiTenantModel
from . import protocol as p
from .chat import chat_prompt_ids, delta_chat_template
from .scheduler import GenerationRequest, Output, Scheduler, SchedulerError

DEFAULT_COMPLETION_TOKENS = 16           # OpenAI's default max_tokens for /v1/completions


def create_app(scheduler: Scheduler, tokenizer, max_model_len: int) -> FastAPI:
    """The FastAPI app; starts the scheduler's worker on startup and stops it on shutdown.
    `tokenizer` encodes prompts on the event loop (the scheduler decodes with its own)."""

    @asynccontextmanager
    async def lifespan(_app):
        scheduler.start()
        yield
        scheduler.stop()

    app = FastAPI(title="prinmix serve", lifespan=lifespan)
    app.state.scheduler = scheduler
    created = int(time.time())
    vocab = scheduler.model.model.config.get_text_config().vocab_size
    templates: dict[str, str | None] = {}

    _add_error_handlers(app)

    def tenant_of(model: str) -> str | None:
        if model == scheduler.base_name:
            return None
        if model in scheduler.tenant_paths:
            return model
        raise p.APIError(404, f"The model `{model}` does not exist.", code="model_not_found", param="model")

    def chat_template(tenant: str | None) -> str | None:
        if tenant is None:
            return None
        if tenant not in templates:
            templates[tenant] = delta_chat_template(scheduler.tenant_paths.get(tenant, ""))
        return templates[tenant]

    def generation_limit(body: p.SamplingRequest, prompt: list[int], requested: int | None, default: int | None) -> int:
        """max_tokens for this prompt; 400 for n != 1, an empty prompt or one that does not fit."""
        if body.n not in (None, 1):
            raise p.APIError(400, "only n=1 is supported", param="n")
        if not prompt:
            raise p.APIError(400, "the prompt is empty", param="prompt")
        room = max_model_len - len(prompt)
        if room < 1:
            raise p.APIError(400, f"This model's maximum context length is {max_model_len} tokens. However, "
                             f"your prompt has {len(prompt)} tokens.", code="context_length_exceeded",
                             param="prompt")
        if requested is not None and requested > room:
            raise p.APIError(400, f"This model's maximum context length is {max_model_len} tokens. However, you "
                             f"requested {len(prompt) + requested} tokens ({len(prompt)} in the prompt, "
                             f"{requested} for the completion).", code="context_length_exceeded",
                             param="max_tokens")
        return requested or min(default or room, room)

    async def outputs(tenant: str | None, prompt: list[int], max_tokens: int, stop: list[str]) -> AsyncIterator[Output]:
        """The request's outputs as the worker delivers them; cancels it when the consumer goes away."""
        queue: asyncio.Queue = asyncio.Queue()
        request = GenerationRequest(tenant, prompt, max_tokens, stop, asyncio.get_running_loop(), queue)
        scheduler.submit(request)
        try:
            while True:
                item = await queue.get()
                if isinstance(item, SchedulerError):
                    raise _api_error(item)
                yield item
                if item.finish_reason:
                    return
        finally:
            scheduler.cancel(request)

    async def collect(gen: AsyncIterator[Output]) -> tuple[str, Output]:
        texts = []
        async for out in gen:
            texts.append(out.text)
        return "".join(texts), out

    def completion_prompt(body: p.CompletionRequest) -> list[int]:
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            if len(prompt) != 1:
                raise p.APIError(400, "only one prompt per request is supported", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            return tokenizer(prompt)["input_ids"]
        if any(not 0 <= t < vocab for t in prompt):
            raise p.APIError(400, f"token ids must be in [0, {vocab})", param="prompt")
        return list(prompt)

    @app.get("/v1/models")
    async def models():
        base = {"id": scheduler.base_name, "object": "model", "created": created, "owned_by": "prinmix",
                "root": str(scheduler.model.base_dir), "parent": None, "max_model_len": max_model_len}
        tenants = [{**base, "id": name, "root": path, "parent": scheduler.base_name}
                   for name, path in list(scheduler.tenant_paths.items())]
        return {"object": "list", "data": [base] + tenants}

    @app.post("/v1/completions")
    async def completions(body: p.CompletionRequest):
        tenant = tenant_of(body.model)
        prompt = completion_prompt(body)
        max_tokens = generation_limit(body, prompt, body.max_tokens, DEFAULT_COMPLETION_TOKENS)
        gen = outputs(tenant, prompt, max_tokens, body.stop_strings())
        rid = p.new_id("cmpl")
        if not body.stream:
            text, last = await collect(gen)
            return p.completion(rid, body.model, text, last.finish_reason,
                                p.usage(last.prompt_tokens, last.completion_tokens))
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunks(out: Output) -> list[dict]:
            found = [p.completion(rid, body.model, out.text, out.finish_reason, None, chunk=True)]
            if out.finish_reason and include_usage:
                found.append({**found[0], "choices": [], "usage": p.usage(out.prompt_tokens, out.completion_tokens)})
            return found

        return await _sse(gen, chunks)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: p.ChatCompletionRequest):
        tenant = tenant_of(body.model)
        prompt = chat_prompt_ids(tokenizer, [m.as_dict() for m in body.messages], chat_template(tenant))
        max_tokens = generation_limit(body, prompt, body.max_completion_tokens or body.max_tokens, None)
        gen = outputs(tenant, prompt, max_tokens, body.stop_strings())
        rid = p.new_id("chatcmpl")
        if not body.stream:
            text, last = await collect(gen)
            return p.chat_completion(rid, body.model, text, last.finish_reason,
                                     p.usage(last.prompt_tokens, last.completion_tokens))
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunks(out: Output) -> list[dict]:
            found = [p.chat_chunk(rid, body.model, {"content": out.text})] if out.text else []
            if out.finish_reason:
                found.append(p.chat_chunk(rid, body.model, {}, out.finish_reason))
                if include_usage:
                    found.append(p.chat_chunk(rid, body.model, None,
                                              use=p.usage(out.prompt_tokens, out.completion_tokens)))
            return found

        head = [p.chat_chunk(rid, body.model, {"role": "assistant", "content": ""})]
        return await _sse(gen, chunks, head)

    @app.post("/v1/load_lora_adapter")
    async def load_adapter(body: p.LoadAdapterRequest):
        if not Path(body.lora_path).is_file():
            raise p.APIError(400, f"no delta file at {body.lora_path}", code="invalid_delta", param="lora_path")
        info = await asyncio.wrap_future(scheduler.load(body.lora_name, body.lora_path))
        templates.pop(body.lora_name, None)
        return {"id": body.lora_name, "object": "model", "root": body.lora_path, "parent": scheduler.base_name,
                "bytes": info}

    @app.post("/v1/unload_lora_adapter")
    async def unload_adapter(body: p.UnloadAdapterRequest):
        await asyncio.wrap_future(scheduler.unload(body.lora_name))
        templates.pop(body.lora_name, None)
        return {"id": body.lora_name, "object": "model", "deleted": True}

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/stats")
    async def stats():
        return {**scheduler.stats.as_dict(), "running": scheduler.num_running, "waiting": scheduler.num_waiting,
                "tenants": scheduler.tenants}

    return app


async def _sse(gen: AsyncIterator[Output], chunks: Callable[[Output], list[dict]], head: list[dict] = ()):
    """A server-sent-events response. The first output is awaited before answering, so that errors found at
    admission (e.g. the tenant was just unloaded) still get their HTTP status; later ones become an error event."""
    first = await anext(gen)

    async def events():
        try:
            for c in head:
                yield f"data: {json.dumps(c)}\n\n"
            out = first
            while True:
                for c in chunks(out):
                    yield f"data: {json.dumps(c)}\n\n"
                if out.finish_reason:
                    break
                out = await anext(gen)
        except p.APIError as e:
            yield f"data: {json.dumps(e.body())}\n\n"
        finally:
            await gen.aclose()
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _api_error(e: SchedulerError) -> p.APIError:
    return p.APIError(e.status, e.message, p.error_type(e.status), e.code)


def _add_error_handlers(app: FastAPI) -> None:
    def respond(status: int, body: dict) -> JSONResponse:
        return JSONResponse(body, status_code=status)

    @app.exception_handler(p.APIError)
    async def api_error(_req: Request, e: p.APIError):
        return respond(e.status, e.body())

    @app.exception_handler(SchedulerError)
    async def scheduler_error(_req: Request, e: SchedulerError):
        return respond(e.status, _api_error(e).body())

    @app.exception_handler(RequestValidationError)
    async def validation_error(_req: Request, e: RequestValidationError):
        errors = e.errors()
        if any(err.get("type") == "json_invalid" for err in errors):
            detail = next(err for err in errors if err.get("type") == "json_invalid")
            reason = (detail.get("ctx") or {}).get("error", "")
            return respond(400, p.error_body(f"malformed JSON in the request body: {reason}".rstrip(": "),
                                             code="invalid_json"))
        parts = [f"{'.'.join(str(x) for x in err['loc'][1:]) or 'body'}: {err['msg']}" for err in errors]
        loc = errors[0]["loc"] if errors else ()
        return respond(400, p.error_body("; ".join(parts), param=str(loc[1]) if len(loc) > 1 else None))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_req: Request, e: StarletteHTTPException):
        return respond(e.status_code, p.error_body(str(e.detail), p.error_type(e.status_code)))

    @app.exception_handler(Exception)
    async def server_error(_req: Request, e: Exception):
        return respond(500, p.error_body(f"internal error: {type(e).__name__}: {e}", "server_error"))


def load_app(base_dir, tenants: dict[str, str], device: str = "auto", max_batch: int = 32,
             max_model_len: int | None = None, base_name: str | None = None,
             log: Callable[[str], None] = print) -> FastAPI:
    """Load the base and the tenants ({name: delta path}), warm every one up, log their resident bytes,
    and return the app (its scheduler starts with the server)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    base_name = base_name or Path(base_dir).resolve().name
    if base_name in tenants:
        raise PrinmixError(f"tenant name {base_name!r} is the base's name; pick another with NAME=DELTA")
    t0 = time.time()
    model = MultiTenantModel(base_dir, device=device)
    for name, path in tenants.items():
        model.add_tenant(name, path)
    config = model.model.config.get_text_config()
    limit = getattr(config, "max_position_embeddings", None) or 2048
    max_model_len = min(max_model_len or limit, limit)
    encoder, decoder = AutoTokenizer.from_pretrained(base_dir), AutoTokenizer.from_pretrained(base_dir)
    eos = model.model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    if decoder.eos_token_id is not None:
        eos_ids.add(decoder.eos_token_id)
    scheduler = Scheduler(model, decoder, base_name, max_batch=max_batch, eos_ids=eos_ids)
    scheduler.warm_up([None, *tenants])
    base_bytes = sum(t.numel() * t.element_size() for t in model.model.parameters())
    log(f"prinmix serve: base {base_name!r} from {base_dir} on {device}: {config.model_type}, "
        f"{_mib(base_bytes)} of weights, max model len {max_model_len}, max batch {max_batch} "
        f"(loaded in {time.time() - t0:.1f} s)")
    for name in tenants:
        b = model.tenant_bytes(name)
        log(f"  tenant {name!r} from {b['delta']} ({b['method']}): {_mib(b['resident_bytes'])} resident "
            f"(linear factors {_mib(b['linear_bytes'])}, other tensors {_mib(b['other_bytes'])})")
    return create_app(scheduler, encoder, max_model_len)


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"
