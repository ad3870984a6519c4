"""Prometheus metrics of the gateway (`GET /metrics`): requests, tokens, latency, sessions, and the swarm's
health per model. One registry per gateway (no process-wide globals), so tests can run several."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "pollen_gateway_requests", "Generation requests by API and outcome", ["api", "outcome"], registry=r
        )
        self.rejected = Counter(
            "pollen_gateway_rejected", "Requests refused before any work (429, 401, 413)", ["reason"], registry=r
        )
        self.busy = Gauge("pollen_gateway_busy_slots", "Generating requests and open WebSocket sessions", registry=r)
        self.capacity = Gauge("pollen_gateway_capacity_slots", "The concurrency limit", registry=r)
        self.prompt_tokens = Counter("pollen_gateway_prompt_tokens", "Prompt tokens sent", ["model"], registry=r)
        self.generated_tokens = Counter("pollen_gateway_generated_tokens", "Tokens generated", ["model"], registry=r)
        self.ttft = Histogram(
            "pollen_gateway_time_to_first_token_seconds", "From request to first token", ["model"],
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.duration = Histogram(
            "pollen_gateway_request_seconds", "Generation request duration", ["api"], buckets=LATENCY_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.model_healthy = Gauge(
            "pollen_swarm_model_healthy", "1 if every block has an online server", ["model"], registry=r
        )
        self.model_blocks = Gauge("pollen_swarm_blocks", "Blocks of the model", ["model"], registry=r)
        self.missing_blocks = Gauge(
            "pollen_swarm_missing_blocks", "Blocks without an online server", ["model"], registry=r
        )
        self.min_replicas = Gauge(
            "pollen_swarm_blocks_online_min", "Fewest online servers holding any one block", ["model"], registry=r
        )
        self.servers = Gauge("pollen_swarm_servers", "Announced servers by state", ["model", "state"], registry=r)
        self.state_update = Gauge(
            "pollen_swarm_state_update_seconds", "Duration of the last swarm state update", registry=r
        )
        self.state_errors = Counter("pollen_swarm_state_update_errors", "Failed swarm state updates", registry=r)

    def observe_state(self, state: Mapping[str, Any]) -> None:
        self.state_update.set(state.get("update_duration", 0.0))
        self.servers.clear()
        for report in state.get("model_reports", []):
            model = report["name"]
            coverage = report["block_coverage"]
            self.model_healthy.labels(model).set(1 if report["state"] == "healthy" else 0)
            self.model_blocks.labels(model).set(report["num_blocks"])
            self.missing_blocks.labels(model).set(len(report["missing_blocks"]))
            self.min_replicas.labels(model).set(min(coverage) if coverage else 0)
            counts: dict[str, int] = {}
            for row in report["server_rows"]:
                counts[row["state"]] = counts.get(row["state"], 0) + 1
            for server_state, n in counts.items():
                self.servers.labels(model, server_state).set(n)

    def render(self) -> bytes:
        return generate_latest(self.registry)
