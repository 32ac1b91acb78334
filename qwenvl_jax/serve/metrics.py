"""The server's Prometheus metrics (`GET /metrics`), on a registry of its own.

Two sources: the engine's counters, read at scrape time through `Engine.stats()` (queue length,
running rows, tokens, image encodes and cache hits, tokens/s since the previous scrape), and what
the HTTP layer measures per request as a client sees it (TTFT from the request's arrival, image
loading included; TPOT between streamed tokens; requests by endpoint and status).
"""

from __future__ import annotations

import threading
import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class _EngineCollector:
    """Gauges and counters from `engine.stats()` at each scrape."""

    def __init__(self, engine):
        self.engine = engine
        self._lock = threading.Lock()
        self._last = (time.monotonic(), 0)

    def collect(self):
        s = self.engine.stats()
        now, tokens = time.monotonic(), int(s.get("tokens_generated", 0))
        with self._lock:
            t0, n0 = self._last
            self._last = (now, tokens)
        rate = (tokens - n0) / (now - t0) if now > t0 else 0.0
        gauges = {
            "queue_length": ("requests waiting for a decode slot", s.get("queue", 0)),
            "running_rows": ("requests decoding now", s.get("running", 0)),
            "slots": ("decode slots", s.get("slots", 0)),
            "image_cache_bytes": (
                "bytes held by the image-feature cache",
                s.get("image_cache_bytes", 0),
            ),
            "compiled_programs": ("programs the engine compiled", s.get("n_compiled", 0)),
            "generation_tokens_per_second": (
                "new tokens per second since the previous scrape",
                rate,
            ),
        }
        for name, (doc, value) in gauges.items():
            g = GaugeMetricFamily(f"qwenvl_{name}", doc)
            g.add_metric([], float(value))
            yield g
        counters = {
            "generation_tokens": ("new tokens generated", "tokens_generated"),
            "prompt_tokens": ("prompt tokens prefilled", "prompt_tokens"),
            "image_encodes": ("images run through the vision tower", "image_encodes"),
            "image_cache_hits": ("images served from the feature cache", "image_cache_hits"),
            "prefix_tokens_reused": (
                "prompt tokens whose keys and values came from the prefix cache",
                "prefix_tokens_reused",
            ),
        }
        for name, (doc, key) in counters.items():
            c = CounterMetricFamily(f"qwenvl_{name}", doc)
            c.add_metric([], float(s.get(key, 0)))
            yield c


class ServerMetrics:
    """The registry of one server: engine gauges plus per-request HTTP measurements."""

    def __init__(self, engine):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(engine))
        self.requests = Counter(
            "qwenvl_http_requests",
            "HTTP requests by endpoint and status",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.ttft = Histogram(
            "qwenvl_time_to_first_token_seconds",
            "request arrival to its first new token (image loading and queueing included)",
            buckets=_TTFT_BUCKETS,
            registry=self.registry,
        )
        self.tpot = Histogram(
            "qwenvl_time_per_output_token_seconds",
            "mean time between a request's new tokens after the first",
            buckets=_TPOT_BUCKETS,
            registry=self.registry,
        )

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)
