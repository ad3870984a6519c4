"""The health dashboard in a real browser (Debian's chromium driven by Playwright; no browser download): both
models healthy, then one of model B's servers stops and the page shows B broken with the hole at its blocks,
without a reload. Also /api/v1/state's keys (health.petals.dev's) and serving two models at once.

Runs after the API tests that use model A; it stops a server of model B only.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.gateway.conftest import GatewayProcess, GatewaySwarm

pytestmark = pytest.mark.e2e

SCREENSHOT_COPY = Path(os.environ.get("POLLEN_ARTIFACTS", "/tmp")) / "pollen-dashboard-hole.png"


def test_state_is_keyed_as_health_petals_dev(gateway: GatewayProcess) -> None:
    state = httpx.get(gateway.url + "/api/v1/state", timeout=30).json()
    assert {"model_reports", "bootstrap_states", "top_contributors", "reachability_issues", "last_updated",
            "update_period", "update_duration"} <= set(state)  # fmt: skip
    assert state["bootstrap_states"] == ["online"] and state["update_period"] == 1.0
    reports = {r["name"]: r for r in state["model_reports"]}
    assert {"tiny-chat-a", "tiny-chat-b"} <= set(reports)
    for report in reports.values():
        assert {"name", "short_name", "state", "num_blocks", "server_rows", "repository", "dht_prefix", "official",
                "limited"} <= set(report)  # fmt: skip
        assert report["state"] == "healthy" and report["num_blocks"] == 4 and report["block_coverage"] == [1] * 4
        for row in report["server_rows"]:
            assert {"short_peer_id", "peer_id", "state", "span", "adapters", "cache_tokens_left_per_block"} <= set(row)
            assert row["state"] == "online" and {"start", "end", "server_info"} <= set(row["span"])
            info = row["span"]["server_info"]
            assert {"throughput", "public_name", "version", "torch_dtype", "quant_type", "adapters",
                    "cache_tokens_left", "state"} <= set(info)  # fmt: skip
            assert info["torch_dtype"] == "float32" and info["quant_type"] == "none" and info["throughput"] > 0
        assert sorted((r["span"]["start"], r["span"]["end"]) for r in report["server_rows"]) == [(0, 2), (2, 4)]


def test_two_models_at_once(gateway: GatewayProcess) -> None:
    with httpx.Client(base_url=gateway.url, headers=gateway.headers, timeout=60) as http:
        for model in ("tiny-chat-a", "tiny-chat-b"):
            body = {"model": model, "prompt": "hello", "max_tokens": 3, "temperature": 0}
            reply = http.post("/v1/completions", json=body)
            assert reply.status_code == 200 and reply.json()["model"] == model


@contextlib.contextmanager
def chromium() -> Iterator[Any]:
    """Debian's chromium under Playwright. Missing chromium fails the test (CI installs it), never skips."""
    executable = shutil.which("chromium")
    if executable is None:
        pytest.fail(
            "the dashboard test needs Debian's chromium on PATH (`apt-get install chromium`; .ci/run installs it). "
            "Playwright's own browser download is not used."
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=executable, headless=True, args=["--no-sandbox", "--disable-dev-shm-usage"]
        )
        try:
            yield browser
        finally:
            browser.close()


def test_dashboard_shows_the_hole_live(gateway: GatewayProcess, gateway_swarm: GatewaySwarm, tmp_path: Path) -> None:
    with chromium() as browser:
        check_dashboard(browser, gateway, gateway_swarm, tmp_path)


def check_dashboard(browser: Any, gateway: GatewayProcess, gateway_swarm: GatewaySwarm, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    page = browser.new_page(viewport={"width": 1280, "height": 800})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(gateway.url + "/")
    model_b = page.locator('section[data-model="tiny-chat-b"]')
    expect(model_b.get_by_test_id("state")).to_have_text("healthy", timeout=30_000)
    expect(model_b.locator(".block")).to_have_count(4)
    expect(model_b.locator(".block.hole")).to_have_count(0)
    expect(model_b.locator("tbody tr")).to_have_count(2)
    page.screenshot(path=str(tmp_path / "dashboard-healthy.png"), full_page=True)

    victim = next(s for s in gateway_swarm.servers_b if s.name.endswith("2-4"))
    gateway_swarm.procs.stop(victim, signal.SIGTERM)

    # no reload: the page's own polling notices
    expect(model_b.get_by_test_id("state")).to_have_text("broken", timeout=30_000)
    expect(model_b).to_have_attribute("data-state", "broken")
    expect(model_b.locator(".block.hole")).to_have_count(2)
    for block, servers in enumerate(["1", "1", "0", "0"]):
        expect(model_b.locator(f'.block[data-block="{block}"]')).to_have_attribute("data-servers", servers)
    expect(model_b.locator(".summary")).to_contain_text("no server holds blocks 2, 3")
    badge = model_b.get_by_test_id("state")
    assert badge.evaluate("e => getComputedStyle(e).backgroundColor") == "rgb(217, 48, 37)"  # red
    model_a = page.locator('section[data-model="tiny-chat-a"]')
    expect(model_a.get_by_test_id("state")).to_have_text("healthy")
    shot = tmp_path / "dashboard-hole.png"
    page.screenshot(path=str(shot), full_page=True)
    shutil.copy(shot, SCREENSHOT_COPY)
    print(f"dashboard screenshots: {tmp_path} (copy of the broken state: {SCREENSHOT_COPY})")
    assert errors == []
