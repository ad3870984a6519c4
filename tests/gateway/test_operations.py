"""Running the gateway: the concurrency limit (429), the size limit (413), CORS (off unless asked), the access
log, /metrics, /healthz, and a clean SIGTERM (exit 0, the servers' sessions closed)."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.gateway.conftest import (
    ALLOWED_ORIGIN,
    MAX_CONCURRENCY,
    GatewayProcess,
    GatewaySwarm,
    start_gateway,
)
from tests.gateway.test_petals_api import open_session, ws_url
from tests.servers import wait_until

pytestmark = pytest.mark.e2e

MODEL = "tiny-chat-a"
COMPLETION = {"model": MODEL, "prompt": "hello", "max_tokens": 2, "temperature": 0}


async def wait_busy(http: httpx.AsyncClient, busy: int) -> None:
    deadline = time.monotonic() + 30
    while (await http.get("/healthz")).json()["busy"] != busy:
        assert time.monotonic() < deadline, f"busy slots never reached {busy}"
        await asyncio.sleep(0.05)


async def test_concurrency_limit_answers_429(gateway: GatewayProcess) -> None:
    async with httpx.AsyncClient(base_url=gateway.url, headers=gateway.headers, timeout=60) as http:
        sessions = [await open_session(gateway) for _ in range(MAX_CONCURRENCY)]  # each holds a slot
        try:
            await wait_busy(http, MAX_CONCURRENCY)
            full = await http.post("/v1/completions", json=COMPLETION)
            assert full.status_code == 429 and full.json()["error"]["code"] == "rate_limit_exceeded"
            petals = await http.post("/api/v1/generate", data={"model": MODEL, "inputs": "hi", "max_new_tokens": 2})
            assert petals.status_code == 429 and petals.json()["ok"] is False
            async with connect(ws_url(gateway), additional_headers=gateway.headers) as ws:
                await ws.send(json.dumps({"type": "open_inference_session", "model": MODEL, "max_length": 32}))
                reply = json.loads(await ws.recv())
                assert reply["ok"] is False and "too many requests" in reply["traceback"]
                with pytest.raises(ConnectionClosed) as closed:
                    await ws.recv()
                assert closed.value.rcvd is not None and closed.value.rcvd.code == 1013  # try again later
        finally:
            for ws in sessions:
                await ws.close()
        await wait_busy(http, 0)
        assert (await http.post("/v1/completions", json=COMPLETION)).status_code == 200


async def test_request_size_limit(gateway: GatewayProcess) -> None:
    big = "x" * 70_000  # over --max-request-bytes 65536
    async with httpx.AsyncClient(base_url=gateway.url, headers=gateway.headers, timeout=60) as http:
        openai_style = await http.post("/v1/completions", json={**COMPLETION, "prompt": big})
        assert openai_style.status_code == 413 and openai_style.json()["error"]["code"] == "request_too_large"
        petals_style = await http.post("/api/v1/generate", data={"model": MODEL, "inputs": big, "max_new_tokens": 1})
        assert petals_style.status_code == 413 and petals_style.json()["ok"] is False

        async def chunked() -> object:  # no Content-Length: counted while it arrives
            for _ in range(10):
                yield b"y" * 10_000

        streamed = await http.post("/v1/completions", content=chunked(), headers={"content-type": "application/json"})
        assert streamed.status_code == 413


async def test_cors_only_for_the_allowed_origin(gateway: GatewayProcess) -> None:
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    async with httpx.AsyncClient(base_url=gateway.url, timeout=60) as http:
        ok = await http.options("/v1/chat/completions", headers={"Origin": ALLOWED_ORIGIN, **preflight})
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
        other = await http.options("/v1/chat/completions", headers={"Origin": "http://evil.example", **preflight})
        assert "access-control-allow-origin" not in other.headers
        simple = await http.get("/api/v1/state", headers={"Origin": ALLOWED_ORIGIN})
        assert simple.headers["access-control-allow-origin"] == ALLOWED_ORIGIN


async def test_metrics_health_and_access_log(gateway: GatewayProcess) -> None:
    async with httpx.AsyncClient(base_url=gateway.url, headers=gateway.headers, timeout=60) as http:
        assert (await http.post("/v1/completions", json=COMPLETION)).status_code == 200
        health = (await http.get("/healthz")).json()
        assert health["ok"] is True and health["models"] == ["tiny-chat-a", "tiny-chat-b"]
        metrics = (await http.get("/metrics")).text
    assert 'pollen_gateway_requests_total{api="openai_completions",outcome="ok"}' in metrics
    assert f'pollen_gateway_generated_tokens_total{{model="{MODEL}"}}' in metrics
    assert f'pollen_swarm_model_healthy{{model="{MODEL}"}} 1.0' in metrics
    assert "pollen_gateway_time_to_first_token_seconds_bucket" in metrics
    # the access log line is written after the response has gone out: wait for it rather than racing it
    await wait_until(lambda: '"GET /metrics" 200' in gateway.log(), "the access log line of GET /metrics")
    log = gateway.log()
    assert '"POST /v1/completions" 200' in log and '"GET /metrics" 200' in log
    assert '"WS /api/v2/generate" 101' in log  # earlier tests' sockets, one line each when they closed
    assert "test-key" not in log  # keys never reach the log


async def test_sigterm_exits_cleanly_and_closes_sessions(
    gateway_swarm: GatewaySwarm, gateway: GatewayProcess, tmp_path: Path
) -> None:
    """A second gateway with default flags: no API key needed, no CORS headers. SIGTERM while a WebSocket
    session is open: the socket closes (1012, service restart), the process exits 0, and the servers free the
    session (the main gateway's state shows their open sessions back at 0)."""
    other = await asyncio.to_thread(start_gateway, tmp_path, gateway_swarm.peers, [gateway_swarm.model_a], name="gw2")
    try:
        async with httpx.AsyncClient(base_url=other.url, timeout=60) as http:
            response = await http.post("/v1/completions", json=COMPLETION, headers={"Origin": ALLOWED_ORIGIN})
            assert response.status_code == 200 and "access-control-allow-origin" not in response.headers
        ws = await open_session(other, max_length=64)
        await ws.send(json.dumps({"type": "generate", "inputs": "hello", "max_new_tokens": 2}))
        assert json.loads(await ws.recv())["ok"]
        async with httpx.AsyncClient(base_url=gateway.url) as main:
            await wait_sessions(main, 1)
            other.popen.send_signal(signal.SIGTERM)
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 30)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1012
            assert await asyncio.to_thread(other.popen.wait, 30) == 0
            await wait_sessions(main, 0)
    finally:
        other.stop(signal.SIGKILL)
    log = other.log()
    assert "SIGTERM received" in log and "gateway stopped" in log and "Traceback" not in log


async def wait_sessions(http: httpx.AsyncClient, expected: int) -> None:
    """Wait until model A's servers together report `expected` open sessions per server."""
    deadline = time.monotonic() + 30
    while True:
        state = (await http.get("/api/v1/state")).json()
        report = next(r for r in state["model_reports"] if r["name"] == MODEL)
        counts = [row["span"]["server_info"]["active_sessions"] for row in report["server_rows"]]
        if counts and all(c == expected for c in counts):
            return
        assert time.monotonic() < deadline, f"servers report {counts} open sessions, expected {expected}"
        await asyncio.sleep(0.2)
