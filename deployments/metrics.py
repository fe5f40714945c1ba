"""Ray Serve custom metrics of the completions endpoint (exported through Ray's Prometheus agent).

Created lazily once per replica process: metric objects need a running Ray worker, and the error
handlers (module-level functions) record into the same objects as the deployment.
"""
from __future__ import annotations

from functools import cache

from ray.serve.metrics import Counter, Histogram

LATENCY_BOUNDARIES_S = [0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300]
OUTCOMES = ("ok", "client_error", "server_error", "cancelled")


class ServeMetrics:
    def __init__(self):
        self.requests = Counter("codefast_requests", description="completion requests by outcome",
                                tag_keys=("outcome",))
        self.generated_tokens = Counter("codefast_generated_tokens",
                                        description="tokens decoded (including ones cut later)")
        self.guard_stops = Counter("codefast_guard_stops",
                                   description="completions the GenGuard stopped")
        self.guard_dropped_tokens = Counter(
            "codefast_guard_dropped_tokens",
            description="tokens decoded but cut from the text because the guard judged them excess")
        self.latency = Histogram("codefast_request_latency_s", description="completion request latency",
                                 boundaries=LATENCY_BOUNDARIES_S, tag_keys=("stream",))

    def record_request(self, outcome: str, latency_s: float | None = None, is_stream: bool = False) -> None:
        assert outcome in OUTCOMES, outcome
        self.requests.inc(1, tags={"outcome": outcome})
        if latency_s is not None:
            self.latency.observe(latency_s, tags={"stream": str(is_stream).lower()})

    def record_results(self, results) -> None:
        """Token counters from engine Results (one per prompt of a request)."""
        num_generated = sum(r.num_generated_tokens for r in results)
        guard_results = [r for r in results if r.finish_reason == "guard"]
        if num_generated:
            self.generated_tokens.inc(num_generated)
        if guard_results:
            self.guard_stops.inc(len(guard_results))
            num_dropped = sum(r.num_dropped_tokens for r in guard_results)
            if num_dropped:
                self.guard_dropped_tokens.inc(num_dropped)


@cache
def serve_metrics() -> ServeMetrics:
    return ServeMetrics()
