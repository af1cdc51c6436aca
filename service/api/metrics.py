"""Prometheus metrics of one service process (its own registry, so tests can build several apps)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

CONTENT_TYPE = "text/plain; version=0.0.4"  # litestar appends "; charset=utf-8"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "lathe_http_requests_total", "HTTP requests answered", ["method", "route", "status"], registry=self.registry)
        self.request_seconds = Histogram(
            "lathe_http_request_duration_seconds", "Time to answer an HTTP request", ["method", "route"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=self.registry)
        self.jobs_active = Gauge(
            "lathe_jobs_active", "Queued and running jobs by phase, as the reconciler last saw them", ["phase"],
            registry=self.registry)
        self.jobs_finished = Counter(
            "lathe_jobs_finished_total", "Jobs that reached a terminal phase (seen by this process)", ["phase"],
            registry=self.registry)
        self.jobs_submitted = Counter(
            "lathe_jobs_submitted_total", "Jobs accepted by POST /v1/jobs", registry=self.registry)
        self.launch_latency = Histogram(
            "lathe_launch_latency_seconds", "From submit (or a retry decision) to the launcher starting the attempt",
            buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600), registry=self.registry)
        self.webhooks = Counter(
            "lathe_webhooks_total", "Webhook outcomes in this process: delivered and dropped events, failed attempts",
            ["outcome"], registry=self.registry)
        self.reconcile_seconds = Histogram(
            "lathe_reconcile_duration_seconds", "One pass of the reconciler", registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)
