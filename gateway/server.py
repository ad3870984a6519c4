"""`pollen gateway`'s lifecycle: connect to the swarm -> read its state -> bind -> serve (FastAPI on uvicorn, in
this process's one event loop, which the swarm clients share) -> print the ready line -> on SIGTERM/SIGINT stop
accepting, let in-flight requests finish for up to `shutdown_grace_s`, close every session, exit 0."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import signal
import socket
import sys
from collections.abc import Iterator

import uvicorn

from gateway.app import create_app
from gateway.config import GatewayConfig
from gateway.registry import Registry
from gateway.service import Gateway
from swarm.aio import write_ready_file
from swarm.net import format_address

log = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: `serve_gateway` owns SIGTERM/SIGINT (uvicorn would re-raise
    the signal after shutting down, and the process would not exit 0)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def bind(host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket on host:port (port 0: any free port), IPv4 or IPv6 as the host says."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


async def serve_gateway(config: GatewayConfig) -> int:
    """Run until SIGTERM/SIGINT; returns the exit code."""
    log.info("connecting to the swarm at %s for %s", ", ".join(config.initial_peers),
             ", ".join(m.source for m in config.models))  # fmt: skip
    # uvicorn's own info lines (connection open/closed, started) repeat what gateway.access and this module log
    logging.getLogger("uvicorn.error").setLevel(max(logging.WARNING, logging.getLogger().level))
    registry = await Registry.connect(config.initial_peers, config.models)
    gateway = Gateway(config, registry)
    try:
        await gateway.start()
        sock = bind(config.host, config.port)
        host, port = sock.getsockname()[:2]
        server = _Server(
            uvicorn.Config(
                create_app(gateway),
                log_config=None,
                access_log=False,  # ours is one line per request, WebSockets included (gateway.access)
                lifespan="off",
                ws="websockets-sansio",
                ws_max_size=config.max_request_bytes,
                timeout_graceful_shutdown=math.ceil(config.shutdown_grace_s),
                # bounds open connections (idle keep-alives and dashboards included); beyond: HTTP 503
                limit_concurrency=max(256, 8 * config.max_concurrency),
                server_header=False,
            )
        )
        loop = asyncio.get_running_loop()

        def on_signal(signum: int) -> None:
            if server.should_exit:
                log.warning("second %s: stopping without waiting for requests", signal.Signals(signum).name)
                server.force_exit = True
                return
            log.info("%s received: finishing in-flight requests (up to %.0f s), then stopping",
                     signal.Signals(signum).name, config.shutdown_grace_s)  # fmt: skip
            gateway.draining = True
            server.should_exit = True

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig)
        serving = asyncio.create_task(server.serve(sockets=[sock]), name="uvicorn")
        while not server.started and not serving.done():
            await asyncio.sleep(0.02)
        if serving.done():
            await serving  # raises what stopped it
            return 1
        url = f"http://{format_address(host, port)}"
        sys.stdout.write(f"pollen gateway ready at {url} (models: {', '.join(registry.names)})\n")
        sys.stdout.flush()
        write_ready_file(str(config.ready_file) if config.ready_file else None, url)
        await serving
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    finally:
        await gateway.stop()
        log.info("gateway stopped")
    sys.stdout.flush()
    return 0
