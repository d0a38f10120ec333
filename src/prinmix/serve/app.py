"""OpenAI-compatible HTTP server over one base model and its delta tenants (FastAPI).

    GET  /v1/models                 the base and every tenant ("parent" = the base for tenants)
    POST /v1/completions            prompt: a string or token ids (one prompt per request)
    POST /v1/chat/completions       messages rendered with the chat template (see serve/chat.py)
    POST /v1/load_lora_adapter      {"lora_name", "lora_path"}: register a delta file as a tenant (as vLLM);
    POST /v1/unload_lora_adapter    {"lora_name"}: remove an idle tenant (409 while it has requests);
                                    both 403 unless runtime loading is on (serve/runtime_loading.py)
    GET  /health                    liveness, the only endpoint answered without the API key
    GET  /stats, /metrics, /version the scheduler's counters (JSON; Prometheus text); prinmix's version

`model` names a tenant or the base. Both generation endpoints stream with `stream: true` (server-sent
events `data: {...}`, ending with `data: [DONE]`). Sampling: temperature (default 1; 0 = greedy), top_p,
top_k, seed (choice i of n uses seed + i), n, stop, max_tokens, logprobs / top_logprobs, all per request
within one batched step (serve/sampling.py); fields the server cannot honour are a 400 naming them.
Errors are OpenAI-shaped: {"error": {"message", "type", "param", "code"}} (unknown model 404
model_not_found; malformed JSON, invalid fields and prompts over --max-model-len 400; no or a wrong API
key 401; a body over --max-body-bytes 413). A 500 never carries the exception's text (the log has it).

Nothing a request sends can stall the event loop: bodies are size-limited before parsing; a text prompt
longer than max_model_len × the vocabulary's longest token (in characters) cannot fit and is refused
before tokenising; tokenising and chat templates run on one worker thread (the fast tokenizer is not
safe to call from several at once). A non-streaming request whose client disconnects is cancelled.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from jinja2 import TemplateError
from starlette.exceptions import HTTPException as StarletteHTTPException
from transformers import AutoTokenizer

from .. import __version__
from ..errors import PrinmixError
from ..runtime.multi_tenant import MultiTenantModel
from . import protocol as p
from .chat import chat_prompt_ids, delta_chat_template
from .config import ServerConfig
from .metrics import RequestCountMiddleware, ServerMetrics
from .middleware import ApiKeyMiddleware, BodySizeLimitMiddleware
from .runtime_loading import DeltaDirectories, check_tenant_name
from .scheduler import GenerationRequest, Output, Scheduler, SchedulerError

DEFAULT_COMPLETION_TOKENS = 16           # OpenAI's default max_tokens for /v1/completions
CLIENT_CLOSED_REQUEST = 499              # nginx's status for a request whose client went away

log = logging.getLogger("prinmix.serve")


class _ClientGone(Exception):
    """The client of a non-streaming request disconnected before its answer was ready."""


def create_app(scheduler: Scheduler, tokenizer, max_model_len: int, config: ServerConfig | None = None) -> FastAPI:
    """The FastAPI app; starts the scheduler's worker on startup and stops it on shutdown.
    `tokenizer` encodes prompts on the app's tokenising thread (the scheduler decodes with its own)."""
    config = config or ServerConfig()
    tokenize_pool = ThreadPoolExecutor(1, thread_name_prefix="prinmix-tokenize")

    @asynccontextmanager
    async def lifespan(_app):
        scheduler.start()
        yield
        scheduler.stop()
        tokenize_pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="prinmix serve", version=__version__, lifespan=lifespan)
    app.state.scheduler = scheduler
    metrics = ServerMetrics(scheduler)
    app.state.metrics = metrics
    created = int(time.time())
    vocab = scheduler.model.model.config.get_text_config().vocab_size
    templates: dict[str, str | None] = {}
    delta_dirs = DeltaDirectories(config.runtime_delta_dirs)
    # a token never covers more characters than its vocabulary string has (byte-level BPE: one character per
    # byte; sentencepiece: the text itself), so longer text cannot fit in max_model_len tokens (unless a
    # normalizer deletes characters, e.g. accents: such text is refused although it might fit)
    max_prompt_chars = max_model_len * max(len(t) for t in tokenizer.get_vocab())

    _add_error_handlers(app)
    # the last added runs first: count every answer (401 and 413 too), then the key (no key, no body read),
    # then the body limit
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=config.max_body_bytes)
    if config.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=config.api_key)
    app.add_middleware(RequestCountMiddleware, metrics=metrics)

    def tenant_of(model: str) -> str | None:
        if model == scheduler.base_name:
            return None
        if model in scheduler.tenant_paths:
            return model
        raise p.APIError(404, f"The model `{model}` does not exist.", code="model_not_found", param="model")

    def chat_template(tenant: str | None) -> str | None:
        """--chat-template, else the tenant's own, else the base's (cached). On the tokenising thread: reading
        a delta's aux files is file I/O."""
        if tenant not in templates:
            own = None if config.chat_template or tenant is None \
                else delta_chat_template(scheduler.tenant_paths.get(tenant, ""))
            templates[tenant] = config.chat_template or own or getattr(tokenizer, "chat_template", None)
        return templates[tenant]

    async def off_loop(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(tokenize_pool, fn, *args)

    def too_long(tokens: int | None = None) -> p.APIError:
        found = f"your prompt has {tokens} tokens" if tokens is not None else "your prompt's text is longer than any " \
            f"{max_model_len} tokens can be"
        return p.APIError(400, f"This model's maximum context length is {max_model_len} tokens. However, {found}.",
                          code="context_length_exceeded", param="prompt")

    def generation_limit(prompt: list[int], requested: int | None, default: int | None) -> int:
        """max_tokens for this prompt; 400 for an empty prompt or one that does not fit."""
        if not prompt:
            raise p.APIError(400, "the prompt is empty", param="prompt")
        room = max_model_len - len(prompt)
        if room < 1:
            raise too_long(len(prompt))
        if requested is not None and requested > room:
            raise p.APIError(400, f"This model's maximum context length is {max_model_len} tokens. However, you "
                             f"requested {len(prompt) + requested} tokens ({len(prompt)} in the prompt, "
                             f"{requested} for the completion).", code="context_length_exceeded",
                             param="max_tokens")
        return requested or min(default or room, room)

    async def outputs(tenant: str | None, prompt: list[int], max_tokens: int, body: p.SamplingRequest,
                      logprobs: int | None) -> AsyncIterator[Output]:
        """The outputs of the request's n choices as the worker delivers them (one queue for all); cancels
        every choice when the consumer goes away."""
        queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        requests = [GenerationRequest(tenant, prompt, max_tokens, body.stop_strings(), loop, queue, params, i)
                    for i, params in enumerate(body.sampling_params(logprobs))]
        try:
            for r in requests:
                scheduler.submit(r)
            unfinished = len(requests)
            while unfinished:
                item = await queue.get()
                if isinstance(item, SchedulerError):
                    raise _api_error(item)
                yield item
                unfinished -= bool(item.finish_reason)
        finally:
            for r in requests:
                scheduler.cancel(r)

    async def collect(gen: AsyncIterator[Output], n: int) -> tuple[list[str], list[list], list[Output]]:
        """Each choice's text, logprob entries and last output."""
        texts, entries, last = [[] for _ in range(n)], [[] for _ in range(n)], [None] * n
        async for out in gen:
            texts[out.index].append(out.text)
            entries[out.index].extend(out.logprobs)
            last[out.index] = out
        return ["".join(t) for t in texts], entries, last

    async def unless_disconnected(request: Request, work):
        """The result of awaitable `work`, or _ClientGone (work cancelled) once the client disconnects."""
        task, watch = asyncio.ensure_future(work), asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
        if task.done():
            return task.result()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise _ClientGone

    def usage(last: list[Output]) -> dict:
        return p.usage(last[0].prompt_tokens, sum(o.completion_tokens for o in last))

    def token_text(token: int) -> str:
        return tokenizer.decode([token])

    def tokenize_text(text: str) -> list[int]:
        return tokenizer(text)["input_ids"]

    async def completion_prompt(body: p.CompletionRequest) -> list[int]:
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            if len(prompt) != 1:
                raise p.APIError(400, "only one prompt per request is supported", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            if len(prompt) > max_prompt_chars:
                raise too_long()
            return await off_loop(tokenize_text, prompt)
        if len(prompt) > max_model_len:
            raise too_long(len(prompt))
        if any(not 0 <= t < vocab for t in prompt):
            raise p.APIError(400, f"token ids must be in [0, {vocab})", param="prompt")
        return list(prompt)

    async def chat_prompt(body: p.ChatCompletionRequest, tenant: str | None) -> list[int]:
        messages = [m.as_dict() for m in body.messages]
        # every chat template known to us spends at least one token per message (its role marker), so more
        # messages than max_model_len cannot fit either; both checks bound the template's work before it runs
        if len(messages) > max_model_len or sum(len(m["content"]) for m in messages) > max_prompt_chars:
            raise too_long()
        template = await off_loop(chat_template, tenant)
        if not template:
            raise p.APIError(400, f"the model `{body.model}` has no chat template; start the server with "
                             f"--chat-template FILE or use /v1/completions", code="chat_template_missing",
                             param="messages")
        try:
            return await off_loop(chat_prompt_ids, tokenizer, messages, template)
        except TemplateError as e:           # the template's own refusal, e.g. roles that must alternate
            raise p.APIError(400, f"the chat template refused the messages: {e}", param="messages") from None

    async def answer(request: Request, body: p.SamplingRequest, gen: AsyncIterator[Output], respond, chunks,
                     head: list[dict] = ()):
        """A non-streaming answer built by respond(texts, entries, last), or the chunks(out) of an SSE stream."""
        if body.stream:
            return await _sse(gen, chunks, head)
        try:
            return respond(*await unless_disconnected(request, collect(gen, body.n)))
        except _ClientGone:
            return Response(status_code=CLIENT_CLOSED_REQUEST)

    @app.get("/v1/models")
    async def models():
        base = {"id": scheduler.base_name, "object": "model", "created": created, "owned_by": "prinmix",
                "root": str(scheduler.model.base_dir), "parent": None, "max_model_len": max_model_len}
        tenants = [{**base, "id": name, "root": path, "parent": scheduler.base_name}
                   for name, path in list(scheduler.tenant_paths.items())]
        return {"object": "list", "data": [base] + tenants}

    @app.post("/v1/completions")
    async def completions(body: p.CompletionRequest, request: Request):
        tenant = tenant_of(body.model)
        body.refuse_unsupported()
        prompt = await completion_prompt(body)
        max_tokens = generation_limit(prompt, body.max_tokens, DEFAULT_COMPLETION_TOKENS)
        gen = outputs(tenant, prompt, max_tokens, body, body.logprobs)
        rid = p.new_id("cmpl")
        offsets = [0] * body.n

        def logprobs(entries: list, index: int) -> dict | None:
            if body.logprobs is None:
                return None
            found = p.completion_logprobs(entries, token_text, offsets[index])
            offsets[index] += sum(len(t) for t in found["tokens"])
            return found

        def respond(texts, entries, last):
            choices = [p.completion_choice(i, texts[i], last[i].finish_reason, logprobs(entries[i], i))
                       for i in range(body.n)]
            return p.completion(rid, body.model, choices, usage(last))

        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        done: dict[int, Output] = {}

        def chunks(out: Output) -> list[dict]:
            choice = p.completion_choice(out.index, out.text, out.finish_reason, logprobs(out.logprobs, out.index))
            found = [p.completion(rid, body.model, [choice], None, chunk=True)]
            if out.finish_reason:
                done[out.index] = out
                if include_usage and len(done) == body.n:
                    found.append({**found[0], "choices": [], "usage": usage(list(done.values()))})
            return found

        return await answer(request, body, gen, respond, chunks)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: p.ChatCompletionRequest, request: Request):
        tenant = tenant_of(body.model)
        body.refuse_unsupported()
        prompt = await chat_prompt(body, tenant)
        max_tokens = generation_limit(prompt, body.max_completion_tokens or body.max_tokens, None)
        gen = outputs(tenant, prompt, max_tokens, body, body.logprob_count())
        rid = p.new_id("chatcmpl")

        def logprobs(entries: list) -> dict | None:
            return p.chat_logprobs(entries, token_text) if body.logprobs else None

        def respond(texts, entries, last):
            choices = [p.chat_choice(i, texts[i], last[i].finish_reason, logprobs(entries[i])) for i in range(body.n)]
            return p.chat_completion(rid, body.model, choices, usage(last))

        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        done: dict[int, Output] = {}

        def chunks(out: Output) -> list[dict]:
            found = [p.chat_chunk(rid, body.model, {"content": out.text}, index=out.index,
                                  logprobs=logprobs(out.logprobs))] if out.text else []
            if out.finish_reason:
                done[out.index] = out
                found.append(p.chat_chunk(rid, body.model, {}, out.finish_reason, index=out.index))
                if include_usage and len(done) == body.n:
                    found.append(p.chat_chunk(rid, body.model, None, use=usage(list(done.values()))))
            return found

        head = [p.chat_chunk(rid, body.model, {"role": "assistant", "content": ""}, index=i) for i in range(body.n)]
        return await answer(request, body, gen, respond, chunks, head)

    def require_runtime_loading() -> None:
        if not config.allow_runtime_loading:
            raise p.APIError(403, "runtime loading is off on this server; start it with --allow-runtime-loading "
                             "and --runtime-delta-dir DIR (or VLLM_ALLOW_RUNTIME_LORA_UPDATING=true)",
                             code="runtime_loading_disabled")

    @app.post("/v1/load_lora_adapter")
    async def load_adapter(body: p.LoadAdapterRequest):
        require_runtime_loading()
        try:
            check_tenant_name(body.lora_name)
        except PrinmixError as e:
            raise p.APIError(400, str(e), code="invalid_tenant_name", param="lora_name") from None
        try:
            path = delta_dirs.resolve(body.lora_path)
        except PrinmixError as e:
            raise p.APIError(400, str(e), code="invalid_delta", param="lora_path") from None
        info = await asyncio.wrap_future(scheduler.load(body.lora_name, str(path), body.lora_path, config.max_tenants))
        templates.pop(body.lora_name, None)
        return {"id": body.lora_name, "object": "model", "root": body.lora_path, "parent": scheduler.base_name,
                "bytes": info}

    @app.post("/v1/unload_lora_adapter")
    async def unload_adapter(body: p.UnloadAdapterRequest):
        require_runtime_loading()
        await asyncio.wrap_future(scheduler.unload(body.lora_name))
        templates.pop(body.lora_name, None)
        return {"id": body.lora_name, "object": "model", "deleted": True}

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/version")
    async def version():
        return {"version": __version__}

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/stats")
    async def stats():
        return {**scheduler.stats.as_dict(), "running": scheduler.num_running, "waiting": scheduler.num_waiting,
                "tenants": scheduler.tenants}

    return app


async def _disconnected(request: Request) -> None:
    """Returns once the client has disconnected (the body was read before; receive then waits for that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


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
                out = await anext(gen, None)
                if out is None:
                    break
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
    async def server_error(req: Request, e: Exception):
        log.error("%s %s failed", req.method, req.url.path, exc_info=e)
        return respond(500, p.error_body("internal server error; the server log has the details", "server_error"))


def load_app(base_dir, tenants: dict[str, str], device: str = "auto", config: ServerConfig | None = None,
             log: Callable[[str], None] = print) -> FastAPI:
    """Load the base and the tenants ({name: delta path}), warm every one up, log their resident bytes,
    and return the app (its scheduler starts with the server). PrinmixError (one line) for bad settings."""
    config = config or ServerConfig()
    config.check()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    base_name = config.base_name or Path(base_dir).resolve().name
    if base_name in tenants:
        raise PrinmixError(f"tenant name {base_name!r} is the base's name; pick another with NAME=DELTA")
    for name in tenants:
        check_tenant_name(name)
    if len(tenants) > config.max_tenants:
        raise PrinmixError(f"{len(tenants)} tenants but --max-tenants is {config.max_tenants}")
    t0 = time.time()
    model = MultiTenantModel(base_dir, device=device, dtype=None if config.dtype == "auto" else getattr(torch, config.dtype))
    for name, path in tenants.items():
        model.add_tenant(name, path)
    text_config = model.model.config.get_text_config()
    limit = getattr(text_config, "max_position_embeddings", None) or 2048
    max_model_len = min(config.max_model_len or limit, limit)
    encoder, decoder = AutoTokenizer.from_pretrained(base_dir), AutoTokenizer.from_pretrained(base_dir)
    eos = model.model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    if decoder.eos_token_id is not None:
        eos_ids.add(decoder.eos_token_id)
    scheduler = Scheduler(model, decoder, base_name, max_batch=config.max_batch, eos_ids=eos_ids)
    scheduler.warm_up([None, *tenants])
    base_bytes = sum(t.numel() * t.element_size() for t in model.model.parameters())
    log(f"prinmix serve: base {base_name!r} from {base_dir} on {device}: {text_config.model_type}, "
        f"{_mib(base_bytes)} of weights, max model len {max_model_len}, max batch {config.max_batch} "
        f"(loaded in {time.time() - t0:.1f} s)")
    for name in tenants:
        b = model.tenant_bytes(name)
        log(f"  tenant {name!r} from {b['delta']} ({b['method']}): {_mib(b['resident_bytes'])} resident "
            f"(linear factors {_mib(b['linear_bytes'])}, other tensors {_mib(b['other_bytes'])})")
    log(f"  API key {'required' if config.api_key else 'off'}; runtime loading "
        + (f"on from {', '.join(config.runtime_delta_dirs)}" if config.allow_runtime_loading else "off"))
    return create_app(scheduler, encoder, max_model_len, config)


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"
