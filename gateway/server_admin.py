"""`pollen server pause|resume|status --admin-socket PATH`: drive a running shard-server through its local admin
endpoint (`pollen.v1.Admin` on a Unix socket, see shard_server/admin.py; the server logs its socket at start).

pause   stop taking sessions and announce PAUSED; open sessions get --grace seconds to finish, the rest are
        closed (their clients continue on other servers with the same tokens); then the weights and KV cache
        are freed. The server stays a member of the swarm with the same peer id.
resume  reload the same blocks and announce ONLINE again.
status  what the server is doing and holding.

Exit codes: 0 done (also for a no-op: pause when paused, resume when online), 1 the server refused (e.g. it is
starting or moving blocks) or failed, 2 usage error or no server reachable on the socket.
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
from pathlib import Path

import grpc
from google.protobuf.json_format import MessageToDict

from swarm.pb import admin_pb2, admin_pb2_grpc

STATUS_TIMEOUT_S = 10.0
RELOAD_TIMEOUT_S = 900.0  # a resume reloads the blocks: minutes for a big model on a slow disk


class UsageError(Exception):
    """Exit 2: a bad flag or no server behind the socket."""


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "server",
        help="pause, resume or inspect a shard-server running on this machine",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = p.add_subparsers(dest="action", required=True, metavar="{pause,resume,status}")
    for name, help_text in (
        ("pause", "stop taking sessions, let open ones finish within --grace, free the memory; stay in the swarm"),
        ("resume", "reload the blocks and serve again under the same peer id"),
        ("status", "show state, peer id, blocks, sessions and memory held"),
    ):
        a = actions.add_parser(name, help=help_text, description=help_text)
        a.add_argument(
            "--admin-socket",
            required=True,
            metavar="PATH",
            help="the server's admin socket (logged by shard-server at start; by default "
            "$XDG_RUNTIME_DIR/pollen/shard-PORT.sock or ~/.cache/pollen/run/shard-PORT.sock)",
        )
        a.add_argument("--json", action="store_true", help="print the server's AdminStatus as JSON")
        if name == "pause":
            a.add_argument(
                "--grace",
                type=float,
                default=None,
                metavar="S",
                help="seconds open sessions may keep running before they are closed and their clients move to "
                "other servers (default: the server's --drain-timeout; 0 = close them at once)",
            )


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except UsageError as e:
        sys.stderr.write(f"pollen server {args.action}: error: {e}\n")
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.action == "pause" and args.grace is not None and not 0 <= args.grace <= 3600:
        raise UsageError(f"--grace must be between 0 and 3600 seconds, got {args.grace}")
    path = _socket(args.admin_socket)
    with grpc.insecure_channel(f"unix:{path}") as channel:
        stub = admin_pb2_grpc.AdminStub(channel)
        try:
            if args.action == "pause":
                request = admin_pb2.PauseRequest()
                if args.grace is not None:
                    request.grace_s = args.grace
                status = stub.Pause(request, timeout=RELOAD_TIMEOUT_S + (args.grace or 0))
            elif args.action == "resume":
                status = stub.Resume(admin_pb2.ResumeRequest(), timeout=RELOAD_TIMEOUT_S)
            else:
                status = stub.Status(admin_pb2.StatusRequest(), timeout=STATUS_TIMEOUT_S)
        except grpc.RpcError as e:
            code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
            details = e.details() if hasattr(e, "details") else str(e)
            if code == grpc.StatusCode.UNAVAILABLE:
                raise UsageError(f"no shard-server answers on {path} ({details})") from None
            sys.stderr.write(f"pollen server {args.action}: {code.name}: {details}\n")
            return 1
    if args.json:
        data = MessageToDict(status, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
        sys.stdout.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
    else:
        sys.stdout.write(format_status(status, args.action))
    return 0


def _socket(text: str) -> Path:
    """The socket path, checked enough to say clearly why nothing could answer there."""
    path = Path(text).expanduser()
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise UsageError(f"no admin socket at {path}: is the shard-server running? It logs its admin socket "
                         "at start ('admin socket ...')") from None  # fmt: skip
    except PermissionError:
        raise UsageError(f"cannot reach {path}: permission denied (only the server's owner may use it)") from None
    if not stat.S_ISSOCK(mode):
        raise UsageError(f"{path} is not a socket: give the path shard-server logged as its admin socket")
    return path


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def format_status(s: admin_pb2.AdminStatus, action: str) -> str:
    lines = []
    if action != "status":
        lines.append(s.message if s.message else action)
    if action == "pause" and s.changed:
        lines.append(f"  sessions: {s.sessions_finished} finished, {s.sessions_closed} closed; the last left after "
                     f"{s.sessions_gone_ms:.0f} ms (pause took {s.transition_ms:.0f} ms)")  # fmt: skip
    if action == "resume" and s.changed:
        lines.append(f"  online after {s.transition_ms:.0f} ms")
    blocks = f"{s.blocks.start}:{s.blocks.end}" if s.HasField("blocks") else "-"
    cuda = f", CUDA {_size(s.device_allocated_bytes)}" if s.device_allocated_bytes else ""
    lines += [
        f"state     {s.state} (for {s.state_since_s:.0f} s)",
        f"peer id   {s.peer_id}",
        f"model     {s.model_id} blocks {blocks} at {s.address}",
        f"sessions  {s.active_sessions} open",
        f"memory    RSS {_size(s.rss_bytes)}, weights {_size(s.weights_bytes)}, KV reserved "
        f"{_size(s.kv_reserved_bytes)}{cuda}",
        f"throughput {s.throughput_tps:.1f} tokens/s announced",
    ]
    return "\n".join(lines) + "\n"
