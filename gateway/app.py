"""The gateway's ASGI application: routes (chat.petals.dev, OpenAI, dashboard) behind the middleware stack
(outermost first): access log -> CORS (only with --cors-origin) -> API keys -> body size limit."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware

from gateway import dashboard, openai_api, petals_api
from gateway.middleware import AccessLog, ApiKeys, ASGIApp, BodyLimit, error_body, is_openai_path
from gateway.service import Gateway


async def _http_error(request: Request, exc: Any) -> Response:
    """Unknown paths and wrong methods, in the format of the API the path belongs to."""
    status = getattr(exc, "status_code", 500)
    detail = getattr(exc, "detail", "error")
    if is_openai_path(request.url.path) or request.url.path.startswith("/api/"):
        body = error_body(request.url.path, status, f"{request.method} {request.url.path}: {detail}", None)
        return Response(body, status, media_type="application/json", headers=getattr(exc, "headers", None))
    return JSONResponse({"detail": detail}, status, headers=getattr(exc, "headers", None))


def create_app(gateway: Gateway) -> ASGIApp:
    app = FastAPI(title="Pollen gateway", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.gateway = gateway
    app.include_router(dashboard.router)
    app.include_router(petals_api.router)
    app.include_router(openai_api.router)
    app.add_exception_handler(HTTPException, _http_error)
    config = gateway.config
    asgi: ASGIApp = BodyLimit(app, config.max_request_bytes)
    asgi = ApiKeys(asgi, config.api_keys)
    if config.cors_origins:
        asgi = CORSMiddleware(
            asgi,  # type: ignore[arg-type]
            allow_origins=list(config.cors_origins),
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["authorization", "content-type"],
            max_age=600,
        )
    return AccessLog(asgi, config.access_log)
