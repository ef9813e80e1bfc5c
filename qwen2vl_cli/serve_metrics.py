"""`qvl serve`'s /metrics in Prometheus' text format (prometheus-client), one registry per server:
requests by status, the line of waiting requests, rows in the running batch, tokens in and out,
time to first token and per output token, and the reuse caches' hits and misses."""

from __future__ import annotations

from qwen2vl_cli.types import Result

# Seconds: from a row's start to its first token (vision tower and prefill), and between tokens.
FIRST_TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
PER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class Metrics:
    def __init__(self, engine, runner):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = registry = CollectorRegistry()
        self.requests = Counter("qvl_requests", "Chat-completion requests answered, by HTTP status.", ["status"], registry=registry)
        self.prompt_tokens = Counter("qvl_prompt_tokens", "Prompt tokens of the answers given.", registry=registry)
        self.cached_tokens = Counter("qvl_cached_prompt_tokens", "Prompt tokens taken from kept keys and values, not prefilled.",
                                     registry=registry)
        self.generation_tokens = Counter("qvl_generation_tokens", "Tokens generated in the answers given.", registry=registry)
        self.first_token = Histogram("qvl_time_to_first_token_seconds", "From a row's start to its first token (vision tower and prefill).",
                                     buckets=FIRST_TOKEN_BUCKETS, registry=registry)
        self.per_token = Histogram("qvl_time_per_output_token_seconds", "Between output tokens of an answer (its decode rate's inverse).",
                                   buckets=PER_TOKEN_BUCKETS, registry=registry)
        Gauge("qvl_queue_depth", "Requests waiting for the model.", registry=registry).set_function(engine.waiting)
        Gauge("qvl_batch_rows", "Rows in the batch the model is running.", registry=registry).set_function(lambda: engine.rows)
        registry.register(_Caches(runner))

    def answered(self, result: Result) -> None:
        """An answer handed back (from the engine's thread)."""
        self.prompt_tokens.inc(result.prompt_tokens)
        self.cached_tokens.inc(result.cached_tokens)
        self.generation_tokens.inc(result.generated_tokens)
        if result.ttft_s is not None:
            self.first_token.observe(result.ttft_s)
        if result.decode_tokens_per_s:
            self.per_token.observe(1.0 / result.decode_tokens_per_s)

    def page(self) -> tuple[bytes, str]:
        """The metrics as Prometheus scrapes them, and their content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _Caches:
    """The reuse caches' counters, read when scraped (the caches keep them)."""

    def __init__(self, runner):
        self.runner = runner

    def collect(self):
        from prometheus_client.core import CounterMetricFamily

        hits = CounterMetricFamily("qvl_cache_hits", "Lookups a reuse cache answered, by cache.", labels=["cache"])
        misses = CounterMetricFamily("qvl_cache_misses", "Lookups a reuse cache could not answer, by cache.", labels=["cache"])
        for name, cache in (("prefix", self.runner.prefixes), ("vision", self.runner.vision), ("media", self.runner.media)):
            if cache is not None:
                hits.add_metric([name], cache.hits)
                misses.add_metric([name], cache.misses)
        yield hits
        yield misses
