"""GET /metrics: the server's counters in the Prometheus text format (prometheus_client).

prometheus_client rather than hand-written text: it owns the exposition format (escaping, TYPE/HELP
lines, histogram buckets), and a custom collector reads the scheduler's own counters at scrape time,
so the worker thread keeps plain integer counters and never calls into the metrics library.
Each app has its own CollectorRegistry (several servers in one process, as in the tests, stay apart).

    prinmix_http_requests_total{endpoint, status}   answered requests (401 / 413 included)
    prinmix_prompt_tokens_total, prinmix_generation_tokens_total
    prinmix_requests_finished_total{reason}         stop / length / cancelled / error
    prinmix_decode_steps_total, prinmix_batch_size  decode steps, histogram of their batch sizes
    prinmix_num_requests_running / _waiting         sequences in the running batch / queued
    prinmix_tenants_registered / _resident          tenants known / with their payload on the device
"""

from __future__ import annotations

from collections import Counter

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)

__all__ = ["RequestCountMiddleware", "ServerMetrics"]

ENDPOINTS = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/load_lora_adapter",
                       "/v1/unload_lora_adapter", "/health", "/stats", "/metrics", "/version"})


class ServerMetrics:
    """The app's metrics registry over `scheduler` (its stats, queue and model) and the HTTP status counts."""

    def __init__(self, scheduler):
        self.scheduler = scheduler
        self.http: Counter = Counter()        # (endpoint, status) → requests; endpoint "other" for unknown paths
        self.registry = CollectorRegistry()
        self.registry.register(self)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def collect(self):
        s = self.scheduler
        stats = s.stats
        http = CounterMetricFamily("prinmix_http_requests", "HTTP requests answered", labels=["endpoint", "status"])
        for (endpoint, status), count in dict(self.http).items():
            http.add_metric([endpoint, str(status)], count)
        yield http
        yield CounterMetricFamily("prinmix_prompt_tokens", "prompt tokens prefilled", value=stats.prompt_tokens)
        yield CounterMetricFamily("prinmix_generation_tokens", "tokens generated", value=stats.generated_tokens)
        finished = CounterMetricFamily("prinmix_requests_finished", "sequences ended, by reason", labels=["reason"])
        for reason, count in dict(stats.finished).items():
            finished.add_metric([reason], count)
        yield finished
        yield CounterMetricFamily("prinmix_decode_steps", "batched decode steps", value=stats.steps)
        sizes = dict(stats.batch_sizes)
        bounds = [b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256) if b < s.max_batch] + [s.max_batch]
        buckets = [(str(b), sum(n for size, n in sizes.items() if size <= b)) for b in bounds]
        yield HistogramMetricFamily("prinmix_batch_size", "sequences per decode step",
                                    buckets=buckets + [("+Inf", sum(sizes.values()))],
                                    sum_value=sum(size * n for size, n in sizes.items()))
        yield GaugeMetricFamily("prinmix_num_requests_running", "sequences in the running batch", s.num_running)
        yield GaugeMetricFamily("prinmix_num_requests_waiting", "requests queued for admission", s.num_waiting)
        tenants = s.tenants
        yield GaugeMetricFamily("prinmix_tenants_registered", "tenants served", len(tenants))
        yield GaugeMetricFamily("prinmix_tenants_resident", "tenants whose payload is on the device",
                                sum(_resident(s.model, t) for t in tenants))


def _resident(model, tenant: str) -> bool:
    try:
        return model.tenant_bytes(tenant)["resident_bytes"] > 0
    except KeyError:                          # unloaded between the listing and this look-up
        return False


class RequestCountMiddleware:
    """Counts answered requests by endpoint and HTTP status into ServerMetrics.http (outermost middleware)."""

    def __init__(self, app, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.metrics.http[(endpoint, message["status"])] += 1
            await send(message)

        return await self.app(scope, receive, counting_send)
