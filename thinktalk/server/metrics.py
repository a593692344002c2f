"""Prometheus metrics, named the way vLLM's are so existing dashboards need little change.

Each server owns its own registry (no global state), so tests can build several apps in one
process. Gauges of the engine (running, waiting, KV) are set by the engine thread after each step;
prometheus_client's metric objects are thread-safe.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  (re-exported for the route)

_LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
_TPOT = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5)
_RTF = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 5.0, 10.0, 50.0)


class Metrics:
    def __init__(self, model_name: str):
        self.registry = r = CollectorRegistry()
        labels = ["model_name"]
        self.model = model_name
        self.requests = Counter("thinktalk_requests", "HTTP API requests by endpoint and status code",
                                ["model_name", "endpoint", "status"], registry=r)
        self.ttft = Histogram("thinktalk_time_to_first_token_seconds", "Arrival to first generated token",
                              labels, buckets=_LATENCY, registry=r)
        self.first_audio = Histogram("thinktalk_time_to_first_audio_seconds", "Arrival to first audio bytes sent",
                                     labels, buckets=_LATENCY, registry=r)
        self.tpot = Histogram("thinktalk_time_per_output_token_seconds", "Mean time between output tokens of a request",
                              labels, buckets=_TPOT, registry=r)
        self.e2e = Histogram("thinktalk_e2e_request_latency_seconds", "Arrival to last byte",
                             labels, buckets=_LATENCY, registry=r)
        self.rtf = Histogram("thinktalk_speech_real_time_factor", "Speech synthesis time / audio duration",
                             labels, buckets=_RTF, registry=r)
        self.prompt_tokens = Counter("thinktalk_prompt_tokens", "Prompt tokens processed", labels, registry=r)
        self.generation_tokens = Counter("thinktalk_generation_tokens", "Tokens generated", labels, registry=r)
        self.audio_seconds = Counter("thinktalk_generated_audio_seconds", "Seconds of speech generated", labels, registry=r)
        self.running = Gauge("thinktalk_num_requests_running", "Requests in the engine's running batch", labels, registry=r)
        self.waiting = Gauge("thinktalk_num_requests_waiting", "Requests queued for the engine", labels, registry=r)
        self.inflight = Gauge("thinktalk_num_requests_in_flight", "Admitted API requests not yet answered",
                              labels, registry=r)
        self.kv_tokens = Gauge("thinktalk_kv_cache_used_tokens", "Tokens held in the KV cache", labels, registry=r)
        self.speaking = Gauge("thinktalk_num_requests_speaking", "Requests the talker is speaking", labels, registry=r)
        self.talker_kv = Gauge("thinktalk_talker_kv_cache_used_tokens", "Tokens held in the talker's KV cache",
                               labels, registry=r)
        self._kv_blocks: tuple[Gauge, Gauge] | None = None

    def observe_stream(self, stream, arrival: float) -> None:
        """Time to first token, mean time per output token and the token count of a finished
        engine stream (`async_engine.RequestStream`) that arrived at `arrival` (perf_counter)."""
        if stream.first_token_at is not None:
            self.ttft.labels(self.model).observe(stream.first_token_at - arrival)
            if stream.num_tokens > 1:
                self.tpot.labels(self.model).observe((stream.last_token_at - stream.first_token_at) / (stream.num_tokens - 1))
        self.generation_tokens.labels(self.model).inc(stream.num_tokens)

    def kv_blocks(self) -> tuple[Gauge, Gauge]:
        """Free/total KV block gauges, made only when the engine has a paged cache to report."""
        if self._kv_blocks is None:
            self._kv_blocks = (
                Gauge("thinktalk_kv_cache_free_blocks", "Free KV cache blocks", ["model_name"], registry=self.registry),
                Gauge("thinktalk_kv_cache_total_blocks", "KV cache blocks in all", ["model_name"], registry=self.registry),
            )
        return self._kv_blocks

    def set_engine(self, stats: dict) -> None:
        m = self.model
        self.running.labels(m).set(stats["running"])
        self.waiting.labels(m).set(stats["waiting"])
        self.kv_tokens.labels(m).set(stats["kv_used_tokens"])
        self.speaking.labels(m).set(stats.get("speaking", 0))
        self.talker_kv.labels(m).set(stats.get("talker_kv_tokens", 0))
        if "kv_free_blocks" in stats:
            free, total = self.kv_blocks()
            free.labels(m).set(stats["kv_free_blocks"])
            total.labels(m).set(stats["kv_total_blocks"])

    def count(self, endpoint: str, status: int) -> None:
        self.requests.labels(self.model, endpoint, str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
