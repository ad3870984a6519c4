"""The one place that opens gRPC channels and servers and parses peer addresses, for every Pollen process.

Clients, shard servers (push, RTT probes) and dht-nodes all talk gRPC with the same options, so a limit or a
keepalive setting is changed here once. Addresses are "HOST:PORT", with IPv6 literals in brackets
("[::1]:31337"), as gRPC itself writes them.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
from collections.abc import Iterable

import grpc

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


def _common_options(max_message_bytes: int) -> list[tuple[str, int]]:
    if max_message_bytes <= 0:
        raise ValueError(f"max_message_bytes must be positive, got {max_message_bytes}")
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
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


def server_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """Options of every gRPC server (shard servers and dht-nodes)."""
    return [
        *_common_options(max_message_bytes),
        # gRPC sets SO_REUSEPORT by default: two servers could then share one TCP port and split its traffic.
        ("grpc.so_reuseport", 0),
        ("grpc.keepalive_time_ms", SERVER_KEEPALIVE_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", MIN_PING_INTERVAL_MS),
        ("grpc.http2.max_pings_without_data", 0),
    ]


def open_channel(address: str, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> grpc.aio.Channel:
    """An insecure grpc.aio channel to "HOST:PORT" with the project's options. Bound to the running event
    loop; cache it per address (ChannelCache) rather than opening one per call."""
    parse_address(address)  # a clear ValueError now rather than an opaque UNAVAILABLE later
    return grpc.aio.insecure_channel(address, options=channel_options(max_message_bytes))


class ChannelCache:
    """Channels by address, opened on first use. Must be used from one event loop (grpc.aio channels are
    bound to theirs)."""

    def __init__(self, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        self.max_message_bytes = max_message_bytes
        self._channels: dict[str, grpc.aio.Channel] = {}

    def get(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = open_channel(address, self.max_message_bytes)
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
