#!/usr/bin/env python3
"""Health probe for Pollen's containers and units: exit 0 when healthy, 1 otherwise (one line says why).

    healthcheck.py [TARGET] [--service NAME] [--timeout S] [--tls-ca FILE] [--tls-server-name NAME]

TARGET `HOST:PORT` (or `[v6]:PORT`) asks a dht-node or shard-server for the standard grpc.health.v1 status
and is healthy only on SERVING (a shard server answers NOT_SERVING while it loads, moves or drains).
TARGET `http://HOST:PORT/PATH` (the gateway) is healthy on any 2xx answer. Without TARGET it reads
$POLLEN_HEALTHCHECK_ADDRESS (the image sets 127.0.0.1:31337, a dht-node's port).

It ships inside the image instead of grpc_health_probe (a separate binary download) and needs only
grpcio and grpcio-health-checking, which Pollen depends on already. It imports nothing of Pollen so that
a probe stays cheap and works whatever state the installed package is in.
"""

from __future__ import annotations

import argparse
import os
import ssl
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence

DEFAULT_TARGET = "127.0.0.1:31337"


def check_grpc(target: str, service: str, timeout_s: float, tls_ca: str | None, server_name: str | None) -> str | None:
    """None when `target` reports SERVING for `service`, else the reason."""
    import grpc  # here, not at the top: an http probe need not pay for it
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    if tls_ca is not None:
        with open(tls_ca, "rb") as f:
            credentials = grpc.ssl_channel_credentials(root_certificates=f.read())
        options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
        channel = grpc.secure_channel(target, credentials, options=options)
    else:
        channel = grpc.insecure_channel(target)
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
            )
        except grpc.RpcError as e:
            return f"{e.code().name}: {e.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return None if reply.status == health_pb2.HealthCheckResponse.SERVING else status


def check_http(url: str, timeout_s: float, tls_ca: str | None) -> str | None:
    """None when GET `url` answers 2xx, else the reason."""
    context = ssl.create_default_context(cafile=tls_ca) if url.startswith("https://") else None
    # No proxies: a container's HTTP(S)_PROXY is for the outside world, never for a probe of itself.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context))
    try:
        with opener.open(url, timeout=timeout_s) as reply:
            return None if 200 <= reply.status < 300 else f"HTTP {reply.status}"
    except urllib.error.HTTPError as e:
        return f"HTTP {e.code}"
    except (urllib.error.URLError, OSError) as e:
        return f"unreachable: {getattr(e, 'reason', e)}"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("target", nargs="?", help="HOST:PORT (gRPC health) or http(s):// URL")
    p.add_argument("--service", default="", help='gRPC health service name (default: "", the whole server)')
    p.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer (default: 3)")
    p.add_argument("--tls-ca", help="CA bundle to verify a TLS server with (gRPC TLS or https)")
    p.add_argument("--tls-server-name", help="name expected in the server's certificate, if not TARGET's host")
    args = p.parse_args(argv)
    target = args.target or os.environ.get("POLLEN_HEALTHCHECK_ADDRESS") or DEFAULT_TARGET
    if target.startswith(("http://", "https://")):
        problem = check_http(target, args.timeout, args.tls_ca)
    else:
        problem = check_grpc(target, args.service, args.timeout, args.tls_ca, args.tls_server_name)
    if problem is not None:
        sys.stdout.write(f"unhealthy: {target}: {problem}\n")
        return 1
    sys.stdout.write(f"healthy: {target}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
