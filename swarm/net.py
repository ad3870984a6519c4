"""The one place that opens gRPC channels and servers and parses peer addresses, for every Pollen process.

Clients, shard servers (push, RTT probes) and dht-nodes all talk gRPC with the same options, so a limit or a
keepalive setting is changed here once. Addresses are "HOST:PORT", with IPv6 literals in brackets
("[::1]:31337"), as gRPC itself writes them.

Security (private swarms) is built here too, from one `Security` value per process: the swarm key's per-call
proofs (swarm.auth interceptors) and optional TLS (server certificate + key; clients verify the server
against a CA). `add_security_args` gives every CLI the same `--swarm-key/--tls-cert/--tls-key/--tls-ca` and
`--tls-server-name` (the name checked in certificates when peers are dialled by IP address).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from swarm.access import AccessInterceptor, CallLimits
from swarm.auth import SwarmKey, auth_client_interceptors, load_swarm_key

# The name to check in servers' certificates when a process dials by IP address but the swarm's certificate names
# a host (e.g. "pollen"): what --tls-server-name sets, for processes without that flag (clients).
TLS_SERVER_NAME_ENV = "POLLEN_TLS_SERVER_NAME"

DEFAULT_MAX_MESSAGE_BYTES = 256 << 20  # a long prefill of a big model is tens of MiB; the gRPC default is 4 MiB

# Keepalive: an inference session is one stream that may sit idle for minutes between user turns. Client
# pings (only while a call is open) notice a peer that vanished without a FIN within ~30 s instead of the
# kernel's hours. The server must accept pings at that rate or it answers GOAWAY "too_many_pings", so its
# minimum interval is below the client's period.
CLIENT_KEEPALIVE_MS = 20_000
SERVER_KEEPALIVE_MS = 60_000  # the server pings too: a vanished client's session (and KV cache) is freed
KEEPALIVE_TIMEOUT_MS = 10_000
MIN_PING_INTERVAL_MS = 10_000

_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9_]([A-Za-z0-9_-]{0,62})(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,62}))*\.?$")


def _common_options(max_message_bytes: int, max_receive_bytes: int | None = None) -> list[tuple[str, int]]:
    receive = max_message_bytes if max_receive_bytes is None else max_receive_bytes
    if max_message_bytes <= 0 or receive <= 0:
        raise ValueError(f"message limits must be positive, got {max_message_bytes} and {receive}")
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        # gRPC refuses a message whose length prefix is over this before reading its body (RESOURCE_EXHAUSTED)
        ("grpc.max_receive_message_length", receive),
    ]


def channel_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """Options of every client channel."""
    return [
        *_common_options(max_message_bytes),
        # Talk to the announced address itself, never through an http_proxy from the environment.
        ("grpc.enable_http_proxy", 0),
        ("grpc.keepalive_time_ms", CLIENT_KEEPALIVE_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 0),  # an idle channel needs no pings; an open stream does
        ("grpc.http2.max_pings_without_data", 0),  # keep pinging an idle stream (the default stops after 2)
    ]


def server_options(
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, max_receive_bytes: int | None = None
) -> list[tuple[str, int]]:
    """Options of every gRPC server (shard servers and dht-nodes). `max_receive_bytes` (default: the same as
    `max_message_bytes`) bounds requests separately when replies may be larger than anything a client sends."""
    return [
        *_common_options(max_message_bytes, max_receive_bytes),
        # gRPC sets SO_REUSEPORT by default: two servers could then share one TCP port and split its traffic.
        ("grpc.so_reuseport", 0),
        ("grpc.keepalive_time_ms", SERVER_KEEPALIVE_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", MIN_PING_INTERVAL_MS),
        ("grpc.http2.max_pings_without_data", 0),
    ]


# ---- security: swarm key and TLS ----


@dataclass(frozen=True)
class TlsFiles:
    """PEM files. A server needs `cert` (its chain) and `key`; a client verifies servers against `ca` (None:
    the system's roots). `server_name` overrides the name checked in server certificates (one certificate
    for a whole private swarm, e.g. "pollen"); None checks the host of the address dialled."""

    cert: str | None = None
    key: str | None = None
    ca: str | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ValueError("--tls-cert and --tls-key go together (the server's certificate and its private key)")
        for flag, path in (("--tls-cert", self.cert), ("--tls-key", self.key), ("--tls-ca", self.ca)):
            if path is not None and not Path(path).expanduser().is_file():
                raise ValueError(f"{flag} {path}: no such file")
        if self.server_name is not None and not _HOSTNAME.match(self.server_name):
            raise ValueError(f"--tls-server-name {self.server_name!r} is not a host name")

    @property
    def serves(self) -> bool:
        return self.cert is not None

    def server_credentials(self) -> grpc.ServerCredentials:
        if self.cert is None or self.key is None:
            raise ValueError("a TLS server needs --tls-cert and --tls-key")
        return grpc.ssl_server_credentials([(_read(self.key), _read(self.cert))])

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=_read(self.ca) if self.ca else None)


def _read(path: str) -> bytes:
    return Path(path).expanduser().read_bytes()


@dataclass(frozen=True)
class Security:
    """How a process talks to its swarm: plaintext (the default), with a swarm key, with TLS, or both."""

    swarm_key: SwarmKey | None = None
    tls: TlsFiles | None = None

    @classmethod
    def from_options(
        cls,
        swarm_key: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        tls_ca: str | None = None,
        env: Mapping[str, str] | None = None,
        tls_server_name: str | None = None,
    ) -> Security:
        """From file paths (CLI flags or a client's keyword arguments); the key may also come from
        $POLLEN_SWARM_KEY and the server name from $POLLEN_TLS_SERVER_NAME (used only with TLS). Raises
        ValueError (SwarmKeyError) with a message that says what to fix."""
        environ = os.environ if env is None else env
        server_name = tls_server_name or environ.get(TLS_SERVER_NAME_ENV, "").strip() or None
        tls = TlsFiles(tls_cert, tls_key, tls_ca, server_name) if (tls_cert or tls_key or tls_ca) else None
        if tls_server_name and tls is None:
            raise ValueError("--tls-server-name needs TLS: give --tls-ca (clients) or --tls-cert/--tls-key")
        return cls(load_swarm_key(swarm_key, env), tls)

    def describe(self) -> str:
        """For the startup log line: never the key itself."""
        parts = [f"swarm key {self.swarm_key.key_id}" if self.swarm_key else "no swarm key"]
        if self.tls is None:
            parts.append("plaintext gRPC")
        else:
            parts.append(f"TLS (server name {self.tls.server_name})" if self.tls.server_name else "TLS")
        return ", ".join(parts)


PLAINTEXT = Security()


def add_security_args(parser: argparse.ArgumentParser) -> None:
    """--swarm-key/--tls-cert/--tls-key/--tls-ca, the same on every Pollen command."""
    group = parser.add_argument_group("private swarms")
    group.add_argument(
        "--swarm-key",
        metavar="FILE",
        help="join a private swarm: a file with >= 32 random bytes (hex or raw) shared by all its processes; "
        "every gRPC call carries a proof of it and every DHT datagram a MAC (default: $POLLEN_SWARM_KEY if set). "
        "Create one with `python -m swarm.auth FILE`",
    )
    group.add_argument("--tls-cert", metavar="PEM", help="serve gRPC over TLS with this certificate (chain)")
    group.add_argument("--tls-key", metavar="PEM", help="the private key of --tls-cert")
    group.add_argument(
        "--tls-ca", metavar="PEM", help="dial other processes over TLS and verify them against this CA bundle"
    )
    group.add_argument(
        "--tls-server-name",
        metavar="NAME",
        help="check this name in the certificates of the servers dialled, instead of the host of their address "
        "(peers announce IP addresses; one certificate for a private swarm may name e.g. `pollen`) "
        f"(default: ${TLS_SERVER_NAME_ENV} if set)",
    )


def security_from_args(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> Security:
    server_name = getattr(args, "tls_server_name", None)  # parsers built before the flag existed lack it
    return Security.from_options(args.swarm_key, args.tls_cert, args.tls_key, args.tls_ca, env, server_name)


def open_channel(
    address: str, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, security: Security = PLAINTEXT
) -> grpc.aio.Channel:
    """A grpc.aio channel to "HOST:PORT" with the project's options, TLS and swarm-key proofs if `security`
    says so. Bound to the running event loop; cache it per address (ChannelCache) rather than per call."""
    parse_address(address)  # a clear ValueError now rather than an opaque UNAVAILABLE later
    options = channel_options(max_message_bytes)
    interceptors = auth_client_interceptors(security.swarm_key) if security.swarm_key is not None else None
    if security.tls is None:
        return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)
    if security.tls.server_name:
        options.append(("grpc.ssl_target_name_override", security.tls.server_name))  # type: ignore[arg-type]
    creds = security.tls.channel_credentials()
    return grpc.aio.secure_channel(address, creds, options=options, interceptors=interceptors)


def create_server(
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    *,
    security: Security = PLAINTEXT,
    limits: CallLimits | None = None,
    max_receive_bytes: int | None = None,
    extra_options: Sequence[tuple[str, int]] = (),
    maximum_concurrent_rpcs: int | None = None,
) -> grpc.aio.Server:
    """A grpc.aio server with the project's options; with a swarm key every call but health checks needs a
    proof (UNAUTHENTICATED otherwise), with `limits` each IP gets a call rate and a cap of unary calls in
    flight (RESOURCE_EXHAUSTED beyond). Bind it with `bind_server` so TLS is used when configured."""
    interceptors = []
    if security.swarm_key is not None or limits is not None:
        interceptors.append(AccessInterceptor(security.swarm_key, limits))
    return grpc.aio.server(
        interceptors=interceptors,
        options=[*server_options(max_message_bytes, max_receive_bytes), *extra_options],
        maximum_concurrent_rpcs=maximum_concurrent_rpcs,
    )


def bind_server(server: grpc.aio.Server, address: str, security: Security = PLAINTEXT) -> int:
    """Listen on "HOST:PORT" (port 0 picks one), over TLS if `security` has a server certificate; returns the
    port. Raises RuntimeError if the port is taken."""
    if security.tls is not None and security.tls.serves:
        return server.add_secure_port(address, security.tls.server_credentials())
    return server.add_insecure_port(address)


class ChannelCache:
    """Channels by address, opened on first use. Must be used from one event loop (grpc.aio channels are
    bound to theirs)."""

    def __init__(self, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, security: Security = PLAINTEXT) -> None:
        self.max_message_bytes = max_message_bytes
        self.security = security
        self._channels: dict[str, grpc.aio.Channel] = {}

    def get(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = open_channel(address, self.max_message_bytes, self.security)
        return channel

    async def discard(self, address: str) -> None:
        """Close the channel to a peer that went away, so a later reconnect starts clean."""
        channel = self._channels.pop(address, None)
        if channel is not None:
            await channel.close()

    async def close(self) -> None:
        channels = list(self._channels.values())
        self._channels.clear()
        await asyncio.gather(*(c.close() for c in channels), return_exceptions=True)

    def __contains__(self, address: object) -> bool:
        return address in self._channels

    def __len__(self) -> int:
        return len(self._channels)


# ---- addresses ----


def parse_address(text: str) -> tuple[str, int]:
    """ "host:port", "1.2.3.4:port" or "[v6]:port" → (host, port), host without brackets.

    Raises ValueError with the offending text for anything else (no port, port out of 1..65535, an IPv6
    literal without brackets, which is ambiguous, or characters no host name has)."""
    if not isinstance(text, str):
        raise ValueError(f"peer address must be a HOST:PORT string, got {type(text).__name__}")
    item = text.strip()
    if item.startswith("["):
        host, sep, port = item[1:].partition("]:")
        if not sep:
            raise ValueError(f"peer address must be [IPV6]:PORT, got {text!r}")
        if not _is_ipv6(host):
            raise ValueError(f"{host!r} in {text!r} is not an IPv6 address")
    else:
        host, sep, port = item.rpartition(":")
        if not sep or not host:
            raise ValueError(f"peer address must be HOST:PORT, got {text!r}")
        if ":" in host and _is_ipv6(host):
            raise ValueError(f"IPv6 addresses need brackets: [{host}]:{port}, got {text!r}")
        if not _HOSTNAME.match(host):
            raise ValueError(f"{host!r} in {text!r} is not a host name or IP address")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"port of {text!r} must be a number in 1..65535")
    return host, int(port)


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def format_address(host: str, port: int) -> str:
    """(host, port) → "host:port", bracketing IPv6 literals; the inverse of parse_address."""
    host = host.strip("[]")
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_addresses(text: str | Iterable[str]) -> list[str]:
    """ "h:p,h:p" or a list of such strings → ["h:p", ...] in canonical form; ValueError on a bad one."""
    items = text.split(",") if isinstance(text, str) else [p for t in text for p in t.split(",")]
    return [format_address(*parse_address(item)) for item in items if item.strip()]
