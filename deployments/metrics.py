"""Ray Serve custom metrics of the completions endpoint (exported through Ray's Prometheus agent).

Created lazily once per replica process: metric objects need a running Ray worker, and the error
handlers (module-level functions) record into the same objects as the deployment.

Ray's agent on each node serves every metric of that node's processes (Ray's, Serve's, vLLM's
engine metrics, these), named with a `ray_` prefix; `cluster_metrics_text` gathers all nodes'
for the Serve LLM app's `GET /metrics`.
"""
from __future__ import annotations

import logging
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from functools import cache

from ray.serve.metrics import Counter, Histogram

logger = logging.getLogger("ray.serve")

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


# ---- every node's metrics as one Prometheus text ----------------------------------------------
NODE_METRICS_TIMEOUT_S = 5  # under Prometheus' default scrape timeout (10 s)


def node_metrics_urls() -> list[str]:
    import ray

    return [f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
            for node in ray.nodes() if node.get("Alive") and node.get("MetricsExportPort")]


def _fetch(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=NODE_METRICS_TIMEOUT_S) as response:
            return response.read().decode()
    except OSError as exc:  # one node's agent down: the other nodes' metrics still go out
        logger.warning("no metrics from %s: %s", url, exc)
        return ""


def merge_metrics_texts(texts: list[str]) -> str:
    """One Prometheus text of several: a metric's samples from every text under one HELP/TYPE
    (Prometheus refuses a metric described twice; Ray labels each sample with its node)."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    families: dict = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            known = families.setdefault(family.name, family)
            if known is not family:
                known.samples.extend(family.samples)

    class Families:
        def collect(self):
            return list(families.values())

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Families())
    return generate_latest(registry).decode()


def cluster_metrics_text() -> str:
    urls = node_metrics_urls()
    with ThreadPoolExecutor(max(len(urls), 1)) as pool:
        return merge_metrics_texts(list(pool.map(_fetch, urls)))
