"""Prometheus metrics of the server (``prometheus_client``, a registry per server): requests by path and
status, latency, prompt and generated tokens, errors, batch sizes, requests waiting."""

from __future__ import annotations

# the paths counted by name; others (unknown paths) are "other", so that they do not create a label each
PATHS = ("/predict", "/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")


class ServeMetrics:
    def __init__(self, engine) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.engine = engine
        self.registry = CollectorRegistry()
        self.requests = Counter("llm_requests", "HTTP requests by path and status", ["path", "status"],
                                registry=self.registry)  # fmt: skip
        self.errors = Counter("llm_errors", "HTTP responses with status 4xx or 5xx", ["path", "status"],
                              registry=self.registry)  # fmt: skip
        self.latency = Histogram("llm_request_latency_seconds", "Time to answer a request", ["path"],
                                 buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
                                 registry=self.registry)  # fmt: skip
        self.prompt_tokens = Counter("llm_prompt_tokens", "Prompt tokens read", registry=self.registry)
        self.generated_tokens = Counter("llm_generated_tokens", "Tokens generated", registry=self.registry)
        self.batch_size = Histogram("llm_batch_size", "Requests generated together",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=self.registry)  # fmt: skip
        self.pending = Gauge(
            "llm_pending_requests", "Requests waiting or being generated", registry=self.registry
        )
        engine.on_batch = self.batch_size.observe  # thread-safe: recorded as each batch starts

    def observe(self, path: str, status: int, seconds: float) -> None:
        if path not in PATHS:
            path = "other"
        self.requests.labels(path, str(status)).inc()
        if status >= 400:
            self.errors.labels(path, str(status)).inc()
        self.latency.labels(path).observe(seconds)

    def tokens(self, prompt: int, generated: int) -> None:
        self.prompt_tokens.inc(prompt)
        self.generated_tokens.inc(generated)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        self.pending.set(self.engine.pending)
        return generate_latest(self.registry)
