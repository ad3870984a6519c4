"""Read-only endpoints: the health dashboard (`/`), its data (`/api/v1/state`, keyed as health.petals.dev's),
Prometheus metrics (`/metrics`) and a liveness probe (`/healthz`). None of them needs an API key."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from gateway.page import PAGE, SCRIPT
from gateway.service import Gateway

router = APIRouter()

# The page loads its script from here and nothing from elsewhere.
CSP = "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; frame-ancestors 'none'"


@router.get("/", response_class=HTMLResponse)
async def dashboard() -> HTMLResponse:
    return HTMLResponse(PAGE, headers={"content-security-policy": CSP, "cache-control": "no-cache"})


@router.get("/dashboard.js")
async def dashboard_script() -> Response:
    return Response(SCRIPT, media_type="text/javascript", headers={"cache-control": "no-cache"})


@router.get("/api/v1/state")
async def state(request: Request) -> JSONResponse:
    gw: Gateway = request.app.state.gateway
    if gw.state is None:
        return JSONResponse({"error": gw.state_error or "the swarm state is not read yet"}, status_code=503)
    body = dict(gw.state)
    if gw.state_error:
        body["last_error"] = gw.state_error  # the last update failed: this is the previous state
    return JSONResponse(body)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    return Response(gw.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get("/healthz")
async def healthz(request: Request) -> JSONResponse:
    gw: Gateway = request.app.state.gateway
    status = 503 if gw.draining else 200
    body = {"ok": not gw.draining, "models": gw.registry.names, "busy": gw.busy, "capacity": gw.config.max_concurrency}
    return JSONResponse(body, status_code=status)
