"""Continuous batching across tenants: one worker thread owns the MultiTenantModel.

Each loop iteration of the worker
  1. runs pending control calls (load / unload a tenant) between steps,
  2. admits waiting requests up to `max_batch` running sequences: one prefill for all of them (any mix of
     tenants and the base), their first tokens are delivered, then they `DecodeState.join` the running batch,
  3. runs ONE decode step for every running sequence (all tenants in the same forward pass),
  4. delivers each sequence's new text to its request and drops finished ones (eos, stop string,
     max_tokens, or cancelled by the client).
Outputs reach a request's asyncio queue through `loop.call_soon_threadsafe`. The steps are the runtime's
(MultiTenantModel.prefill / decode_step); each step's tokens are chosen per request through the runtime's
token-choice hook from the step's logits (serve/sampling.py: greedy, or seeded temperature/top-k/top-p).
A failure inside the model is logged here with its traceback; the request only learns that the server
failed (500) and the request id, never the exception's text.

Unload policy: a tenant with queued or running sequences is not removed; `unload` fails with
SchedulerError(409) and the caller retries later.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from collections import Counter, deque
from concurrent.futures import Future
from dataclasses import dataclass, field

from ..errors import PrinmixError
from ..runtime.multi_tenant import DecodeState, SequenceState, TokenChooser
from .sampling import SamplingParams, TokenLogprob, choose_tokens, new_generator
from .text_stream import TextStream

log = logging.getLogger("prinmix.serve")


class SchedulerError(Exception):
    """A request or control call the worker refused: HTTP status, message and an OpenAI error code."""

    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


@dataclass
class Output:
    """New text of one request (choice `index` of its HTTP request); finish_reason ("stop" / "length") marks
    its last output; logprobs: entries of the tokens generated since the previous output (when asked for)."""

    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    index: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass(eq=False)
class GenerationRequest:
    """One sequence to generate for `tenant` (None = the base) with `params`; outputs go to `queue` on `loop`
    (the n choices of one HTTP request share a queue and tell themselves apart by `index`)."""

    tenant: str | None
    prompt: list[int]
    max_tokens: int
    stop: list[str]
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    params: SamplingParams = field(default_factory=SamplingParams)
    index: int = 0
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    cancelled: bool = False
    stream: TextStream | None = None
    generator: object = None                  # torch.Generator of a sampled request, made at admission
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)

    def deliver(self, item: Output | SchedulerError) -> None:
        """Thread-safe hand-off to the request's event loop (a closed loop cancels the request)."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:
            self.cancelled = True


@dataclass
class SchedulerStats:
    """Counters of the worker: decode steps, prefills, the largest batch, recent steps' tenant mix, tokens
    (prompt and generated), requests by how they ended, and decode steps by batch size (for /metrics)."""

    steps: int = 0
    prefills: int = 0
    max_batch_seen: int = 0
    max_models_in_step: int = 0
    recent_steps: deque = field(default_factory=lambda: deque(maxlen=256))   # (batch size, sorted model names)
    prompt_tokens: int = 0
    generated_tokens: int = 0
    finished: Counter = field(default_factory=Counter)        # "stop" / "length" / "cancelled" / "error" → count
    batch_sizes: Counter = field(default_factory=Counter)     # decode batch size → steps

    def record(self, models: list[str]) -> None:
        distinct = tuple(sorted(set(models)))
        self.steps += 1
        self.batch_sizes[len(models)] += 1
        self.max_batch_seen = max(self.max_batch_seen, len(models))
        self.max_models_in_step = max(self.max_models_in_step, len(distinct))
        self.recent_steps.append((len(models), distinct))

    def as_dict(self) -> dict:
        return {"steps": self.steps, "prefills": self.prefills, "max_batch_seen": self.max_batch_seen,
                "max_models_in_step": self.max_models_in_step, "prompt_tokens": self.prompt_tokens,
                "generated_tokens": self.generated_tokens, "finished": dict(self.finished),
                "recent_steps": [{"batch": b, "models": list(m)} for b, m in self.recent_steps]}


class Scheduler:
    """The worker thread around a MultiTenantModel. `tokenizer` (used only by the worker) decodes outputs;
    `eos_ids` end a sequence; `base_name` names the base in stats."""

    def __init__(self, model, tokenizer, base_name: str, max_batch: int = 32, eos_ids: set[int] | None = None):
        if max_batch < 1:
            raise PrinmixError(f"max_batch must be >= 1, got {max_batch}")
        self.model, self.tokenizer, self.base_name = model, tokenizer, base_name
        self.max_batch = max_batch
        self.eos_ids = set(eos_ids or ())
        self.stats = SchedulerStats()
        self.tenant_paths: dict[str, str] = {n: model.tenant_info[n]["delta"] for n in model.tenants}
        self._cond = threading.Condition()
        self._waiting: deque[GenerationRequest] = deque()
        self._controls: list[tuple[Future, object]] = []
        self._paused = self._stopping = False
        self._state: DecodeState | None = None
        self._running: dict[str, GenerationRequest] = {}
        self._thread: threading.Thread | None = None

    # ---- called from other threads ---------------------------------------------------------------
    @property
    def tenants(self) -> list[str]:
        return list(self.tenant_paths)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_pending_controls(self) -> int:
        return len(self._controls)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="prinmix-scheduler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def pause(self) -> None:
        """Hold admission, decoding and control calls (requests queue up) until resume()."""
        with self._cond:
            self._paused = True

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    def submit(self, request: GenerationRequest) -> None:
        with self._cond:
            if self._stopping:
                raise SchedulerError(503, "the server is shutting down")
            self._waiting.append(request)
            self._cond.notify_all()

    def cancel(self, request: GenerationRequest) -> None:
        """The client went away: the worker drops the request at its next iteration."""
        request.cancelled = True

    def load(self, name: str, delta_path: str, shown_path: str | None = None, max_tenants: int | None = None) -> Future:
        """Register a tenant between steps; the future's result is its tenant_bytes report. Errors name
        `shown_path` (default: delta_path), e.g. the path as the client gave it rather than its real one;
        SchedulerError(409) when `max_tenants` are registered already (checked on the worker, so concurrent
        loads cannot pass it together)."""
        return self._control(lambda: self._load(name, delta_path, shown_path or delta_path, max_tenants))

    def unload(self, name: str) -> Future:
        """Remove an idle tenant between steps (SchedulerError 409 while it has sequences)."""
        return self._control(lambda: self._unload(name))

    def _control(self, fn) -> Future:
        future: Future = Future()
        with self._cond:
            if self._stopping:
                raise SchedulerError(503, "the server is shutting down")
            self._controls.append((future, fn))
            self._cond.notify_all()
        return future

    # ---- the worker ------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and (self._paused or not (self._controls or self._waiting or self._running)):
                    self._cond.wait()
                if self._stopping:
                    break
                controls, self._controls = self._controls, []
            for future, fn in controls:
                self._call(future, fn)
            with self._cond:
                free = self.max_batch - len(self._running)
                admitted = [self._waiting.popleft() for _ in range(min(free, len(self._waiting)))]
            self.stats.finished["cancelled"] += sum(r.cancelled for r in admitted)
            try:
                self._admit([r for r in admitted if not r.cancelled])
                self._step()
            except Exception as e:           # noqa: BLE001 - the worker must survive; fail the affected requests
                self._fail_running(e)
        self._shutdown()

    def _call(self, future: Future, fn) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn())
        except BaseException as e:           # noqa: BLE001 - handed to the waiting caller
            future.set_exception(e)

    def _admit(self, requests: list[GenerationRequest]) -> None:
        known = set(self.model.tenants)
        ready = []
        for r in requests:
            if r.tenant is not None and r.tenant not in known:
                r.deliver(SchedulerError(404, f"The model `{r.tenant}` does not exist.", "model_not_found"))
            else:
                ready.append(r)
        if not ready:
            return
        try:
            for r in ready:
                r.generator = new_generator(r.params, self.model.device)
            new = self.model.prefill([r.prompt for r in ready], [r.tenant for r in ready], [r.id for r in ready],
                                     choose=self._chooser({r.id: r for r in ready}))
        except Exception:
            log.exception("prefill of %d requests failed", len(ready))
            for r in ready:
                r.deliver(_internal_error(r))
            self.stats.finished["error"] += len(ready)
            return
        self.stats.prefills += 1
        self.stats.prompt_tokens += sum(len(r.prompt) for r in ready)
        for r in ready:
            r.stream = TextStream(self.tokenizer, r.stop)
            self._running[r.id] = r
        self._deliver(new)
        if new.seqs:
            self._state = new if self._state is None else DecodeState.join(self._state, new)

    def _step(self) -> None:
        state = self._state
        if state is None:
            return
        state.drop([s.seq_id for s in state.seqs if self._running[s.seq_id].cancelled])
        if state.seqs:
            self.stats.record([self.base_name if s.tenant is None else s.tenant for s in state.seqs])
            self.model.decode_step(state, choose=self._chooser(self._running))
            self._deliver(state)
        cancelled = [rid for rid, r in self._running.items() if r.cancelled]
        self.stats.finished["cancelled"] += len(cancelled)
        for rid in cancelled:
            del self._running[rid]
        if not state.seqs:
            self._state = None

    def _chooser(self, requests: dict[str, GenerationRequest]) -> TokenChooser:
        """The runtime's token-choice hook for one step: each sequence's next token from logits [B, vocab]
        by its request's SamplingParams (requests by sequence id); logprob entries are kept for delivery."""
        def choose(seqs: list[SequenceState], logits) -> list[int]:
            reqs = [requests[s.seq_id] for s in seqs]
            tokens, entries = choose_tokens(logits, [r.params for r in reqs], [r.generator for r in reqs])
            self.stats.generated_tokens += len(tokens)
            for r, entry in zip(reqs, entries):
                if entry is not None:
                    r.pending_logprobs.append(entry)
            return tokens
        return choose

    def _deliver(self, state: DecodeState) -> None:
        """Hand each sequence's new text to its request; drop the finished sequences from `state`."""
        finished = []
        for seq in state.seqs:
            r = self._running[seq.seq_id]
            ids, eos = seq.generated, seq.generated[-1] in self.eos_ids
            done = eos or len(ids) >= r.max_tokens
            text, stopped = r.stream.update(ids[:-1] if eos else ids, final=done)
            reason = "stop" if stopped or eos else "length" if done else None
            if text or reason:
                entries, r.pending_logprobs = r.pending_logprobs, []
                if eos and entries and entries[-1].token == ids[-1]:
                    entries = entries[:-1]             # the eos token's text is not part of the answer
                r.deliver(Output(text, reason, len(r.prompt), len(ids), r.index, entries))
            if reason or r.cancelled:
                self.stats.finished[reason or "cancelled"] += 1
                finished.append(seq.seq_id)
        state.drop(finished)
        for rid in finished:
            self._running.pop(rid, None)

    def _fail_running(self, error: Exception) -> None:
        """A forward failed: its batch's KV cache is unusable, so every running request ends with a 500."""
        log.error("decode step of %d requests failed", len(self._running), exc_info=error)
        for r in self._running.values():
            r.deliver(_internal_error(r))
        self.stats.finished["error"] += len(self._running)
        self._running.clear()
        self._state = None

    def _shutdown(self) -> None:
        for r in list(self._running.values()) + list(self._waiting):
            r.deliver(SchedulerError(503, "the server is shutting down"))
        self._running.clear()
        self._waiting.clear()
        for future, _ in self._controls:
            future.set_exception(SchedulerError(503, "the server is shutting down"))
        self._controls.clear()

    # ---- control calls (worker thread, between steps) ----------------------------------------------
    def _load(self, name: str, delta_path: str, shown_path: str, max_tenants: int | None) -> dict:
        if name == self.base_name or name in self.tenant_paths:
            raise SchedulerError(400, f"The model `{name}` is already being served; unload it first", "model_exists")
        if max_tenants is not None and len(self.tenant_paths) >= max_tenants:
            raise SchedulerError(409, f"this server holds its maximum of {max_tenants} tenants (--max-tenants); "
                                 f"unload one first", "too_many_tenants")
        try:
            self.model.add_tenant(name, delta_path)
            self.warm_up([name])
        except Exception as e:
            if name in self.model.tenants:
                self.model.remove_tenant(name)
            if isinstance(e, PrinmixError):  # one line naming the file and the problem: the user's to fix
                raise SchedulerError(400, f"cannot load {shown_path}: {e}", "invalid_delta") from None
            if isinstance(e, OSError):       # strerror only: the exception's text holds the real (resolved) path
                raise SchedulerError(400, f"cannot load {shown_path}: {e.strerror}", "invalid_delta") from None
            log.exception("loading tenant %r from %s failed", name, delta_path)
            raise SchedulerError(500, f"loading {shown_path} failed; the server log has the details") from None
        self.tenant_paths[name] = str(delta_path)
        return self.model.tenant_bytes(name)

    def _unload(self, name: str) -> None:
        if name == self.base_name:
            raise SchedulerError(400, "the base model cannot be unloaded")
        if name not in self.tenant_paths:
            raise SchedulerError(404, f"The model `{name}` does not exist.", "model_not_found")
        busy = sum(r.tenant == name for r in list(self._running.values()) + list(self._waiting))
        if busy:
            raise SchedulerError(409, f"The model `{name}` has {busy} queued or running requests; "
                                 f"retry the unload when they are done", "model_busy")
        self.model.remove_tenant(name)
        del self.tenant_paths[name]

    def warm_up(self, tenants: list[str | None]) -> None:
        """One 1-token prefill per tenant (and the base): makes them resident and fails early if broken.
        Worker thread only (or before start())."""
        token = next(iter(self.eos_ids), 0) if self.tokenizer.bos_token_id is None else self.tokenizer.bos_token_id
        self.model.prefill([[token]] * len(tenants), list(tenants))


def _internal_error(request: GenerationRequest) -> SchedulerError:
    """What a request learns of a failure inside the model (the log has the traceback)."""
    return SchedulerError(500, f"internal server error while generating request {request.id}; "
                               f"the server log has the details")
