"""`pollen`: a swarm for people at a terminal. Subcommands: `gateway` (HTTP/WebSocket APIs and the health
dashboard), `chat` (interactive chat), `generate` (one prompt, streamed), `swarm` (who serves what), `server`
(pause, resume or inspect a shard-server on this machine through its admin socket)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from gateway.config import ModelSpec
from swarm.logs import setup_logging

log = logging.getLogger("pollen")

EPILOG = """examples:
  pollen gateway --initial-peers 127.0.0.1:31337 --model models/smollm2-135m --port 8000
  pollen chat --initial-peers 127.0.0.1:31337 --model models/smollm2-135m
  pollen generate --initial-peers 127.0.0.1:31337 --model models/smollm2-135m "Once upon a time"
  pollen generate --initial-peers 127.0.0.1:31337 --model models/smollm2-135m --draft self:8 "Once upon a time"
  pollen swarm --initial-peers 127.0.0.1:31337
  pollen server pause --admin-socket $XDG_RUNTIME_DIR/pollen/shard-31330.sock --grace 30"""


def _common(p: argparse.ArgumentParser, model_help: str, model_required: bool, many: bool) -> None:
    p.add_argument(
        "--initial-peers",
        required=True,
        metavar="HOST:PORT[,HOST:PORT]",
        help="dht-node(s) of the swarm (comma-separated or repeated)",
        action="append",
    )
    p.add_argument(
        "--model",
        required=model_required,
        action="append" if many else "store",
        metavar="PATH_OR_NAME",
        help=model_help + " A local folder with config.json (and tokenizer.json for text), or an org/name "
        "in the local Hugging Face cache; append =MODEL_ID when servers announce it under another id.",
    )
    p.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING (default: POLLEN_LOG_LEVEL or INFO)")
    # The client side of swarm.net.add_security_args: this process dials the swarm, it serves no gRPC.
    sec = p.add_argument_group("private swarms")
    sec.add_argument(
        "--swarm-key",
        metavar="FILE",
        help="the swarm key file of a private swarm (the same file as its dht-nodes and servers); every gRPC "
        "call carries a proof of it (default: $POLLEN_SWARM_KEY if set)",
    )
    sec.add_argument(
        "--tls-ca",
        metavar="PEM",
        help="dial dht-nodes and servers over TLS and verify them against this CA bundle (default: $POLLEN_TLS_CA)",
    )
    sec.add_argument(
        "--tls-server-name",
        metavar="NAME",
        help="check this name in the certificates of the dht-nodes and servers dialled, instead of the host of "
        "their address (peers announce IP addresses; one certificate for a private swarm may name e.g. `pollen`) "
        "(default: $POLLEN_TLS_SERVER_NAME if set)",
    )


def _sampling(p: argparse.ArgumentParser, max_new: int, sample: bool) -> None:
    g = p.add_argument_group("generation")
    g.add_argument("--max-new-tokens", type=int, default=max_new, help=f"tokens per reply (default {max_new})")
    g.add_argument(
        "--max-length",
        type=int,
        default=2048,
        help="tokens the server-side session holds: prompt, history and replies (default 2048)",
    )
    mode = g.add_mutually_exclusive_group()
    mode.add_argument(
        "--do-sample",
        dest="do_sample",
        action="store_true",
        default=sample,
        help="sample" + (" (default)" if sample else ""),
    )
    mode.add_argument(
        "--greedy",
        dest="do_sample",
        action="store_false",
        help="always take the most likely token" + ("" if sample else " (default)"),
    )
    g.add_argument("--temperature", type=float, default=0.6 if sample else 1.0)
    g.add_argument("--top-k", type=int, default=0, help="0 = off")
    g.add_argument("--top-p", type=float, default=0.9 if sample else 1.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = off (transformers' rule)")
    g.add_argument("--seed", type=int, default=None, help="seed for sampling (reproducible replies)")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop before this text (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pollen", description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{gateway,chat,generate,swarm,server}")

    gw = sub.add_parser(
        "gateway",
        help="serve chat.petals.dev- and OpenAI-compatible APIs and the dashboard",
        description="Serve the swarm over HTTP: WebSocket /api/v2/generate and POST /api/v1/generate "
        "(chat.petals.dev), /v1/models, /v1/completions, /v1/chat/completions (OpenAI), the health "
        "dashboard at /, /api/v1/state, /metrics and /healthz. Prints a line with `ready` and the URL "
        "once it serves; stops cleanly on SIGTERM.",
    )
    _common(gw, "model to serve (repeat for several).", True, True)
    gw.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    gw.add_argument("--port", type=int, default=8000, help="port (0: any free port; default 8000)")
    gw.add_argument(
        "--max-concurrency",
        type=int,
        default=16,
        help="generating requests plus open WebSocket sessions at once; more get HTTP 429 (default 16)",
    )
    gw.add_argument(
        "--max-length",
        type=int,
        default=2048,
        help="longest session in tokens, prompt + output (default 2048; servers may allow fewer)",
    )
    gw.add_argument(
        "--max-request-bytes",
        type=int,
        default=1 << 20,
        help="largest HTTP body or WebSocket message (default 1 MiB); larger get HTTP 413",
    )
    gw.add_argument(
        "--api-key-file",
        type=Path,
        default=None,
        help="file with one API key per line: generating endpoints then need 'Authorization: Bearer KEY'",
    )
    gw.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="allow browsers on this origin (repeatable; '*' for any). Default: no CORS",
    )
    gw.add_argument("--update-period", type=float, default=10.0, help="seconds between swarm state reads (default 10)")
    gw.add_argument(
        "--ws-idle-timeout",
        type=float,
        default=300.0,
        help="close a WebSocket silent this long, freeing its server caches (default 300 s)",
    )
    gw.add_argument(
        "--shutdown-grace",
        type=float,
        default=10.0,
        help="on SIGTERM, seconds in-flight requests get to finish (default 10)",
    )
    gw.add_argument("--no-access-log", action="store_true", help="do not log one line per request")
    gw.add_argument("--ready-file", type=Path, default=None, help="write the URL here once serving (for launchers)")

    chat = sub.add_parser(
        "chat",
        help="chat with a model in the terminal",
        description="Interactive multi-turn chat through the swarm with the model's chat template; "
        "replies stream as they are generated and one server-side session holds the whole "
        "conversation, so each turn sends only its new tokens.",
    )
    _common(chat, "the model to chat with.", True, False)
    chat.add_argument("--system", default=None, help="system prompt")
    _sampling(chat, 512, True)

    gen = sub.add_parser(
        "generate",
        help="generate from one prompt, streamed to stdout",
        description="Generate a continuation of PROMPT and stream it to stdout.",
    )
    _common(gen, "the model to generate with.", True, False)
    gen.add_argument("prompt", help="the prompt text ('-' reads it from stdin)")
    gen.add_argument("--chat", action="store_true", help="send the prompt as a user message through the chat template")
    _sampling(gen, 64, False)
    spec = gen.add_argument_group("speculative decoding (fewer round trips; greedy output stays the same)")
    spec.add_argument(
        "--draft",
        metavar="SPEC",
        default=None,
        help="draft tokens locally and verify several per round trip through the swarm: `self:N` (this model's "
        "first N blocks + its head, loaded here), `prompt-lookup` (no model: what followed earlier occurrences of "
        "the last 2 tokens in the prompt and reply; `lookup:N` for the last N), or a folder of a small model "
        "with the same tokenizer",
    )
    spec.add_argument(
        "--num-draft-tokens",
        type=int,
        default=None,
        metavar="N",
        help="tokens drafted per round trip, 1-16 (default: 4 for a model, then adapted; 10 for prompt lookup)",
    )

    sw = sub.add_parser(
        "swarm",
        help="show models, block coverage and servers (what the dashboard shows)",
        description="Print each model's state (healthy when every block has an online server), "
        "how many servers hold each block, and its servers. Without --model: every model the "
        "swarm announces. Exit code 0 when all shown models are healthy, 1 otherwise.",
    )
    _common(sw, "only this model (repeatable).", False, True)
    sw.add_argument("--json", action="store_true", help="print /api/v1/state's JSON instead of tables")

    from gateway import server_admin

    server_admin.add_parser(sub)
    return parser


def _peers(values: list[str]) -> tuple[str, ...]:
    from swarm.dht_client import parse_peers

    return tuple(parse_peers(values))


def _use_security(args: argparse.Namespace) -> None:
    """Check --swarm-key/--tls-ca/--tls-server-name now (a clear error before anything connects) and hand them to
    every client this process builds through the environment they read (ClientConfig.security): flags win over it."""
    from client_sdk.config import TLS_CA_ENV
    from swarm.auth import SWARM_KEY_ENV
    from swarm.net import TLS_SERVER_NAME_ENV, Security

    # raises ValueError naming the file or flag to fix (a server name needs TLS: --tls-ca or $POLLEN_TLS_CA)
    tls_ca = args.tls_ca or os.environ.get(TLS_CA_ENV, "").strip() or None
    Security.from_options(swarm_key=args.swarm_key, tls_ca=tls_ca, tls_server_name=args.tls_server_name)
    if args.swarm_key:
        os.environ[SWARM_KEY_ENV] = str(Path(args.swarm_key).expanduser().resolve())
    if args.tls_ca:
        os.environ[TLS_CA_ENV] = str(Path(args.tls_ca).expanduser().resolve())
    if args.tls_server_name:
        os.environ[TLS_SERVER_NAME_ENV] = args.tls_server_name


def _run(args: argparse.Namespace) -> int:
    peers = _peers(args.initial_peers)
    _use_security(args)
    if args.command == "gateway":
        from gateway.config import GatewayConfig, read_api_keys
        from gateway.server import serve_gateway

        config = GatewayConfig(
            initial_peers=peers,
            models=tuple(ModelSpec.parse(m) for m in args.model),
            host=args.host,
            port=args.port,
            max_concurrency=args.max_concurrency,
            max_length=args.max_length,
            max_request_bytes=args.max_request_bytes,
            api_keys=read_api_keys(args.api_key_file) if args.api_key_file else frozenset(),
            cors_origins=tuple(args.cors_origin),
            update_period_s=args.update_period,
            ws_idle_timeout_s=args.ws_idle_timeout,
            shutdown_grace_s=args.shutdown_grace,
            access_log=not args.no_access_log,
            ready_file=args.ready_file,
        )
        return asyncio.run(serve_gateway(config))
    if args.command == "swarm":
        from gateway.terminal import show_swarm

        return asyncio.run(show_swarm(peers, [ModelSpec.parse(m) for m in args.model or []], args.json))

    from gateway.terminal import Sampling, generate_once

    sampling = Sampling(
        args.max_new_tokens,
        args.max_length,
        args.do_sample,
        args.temperature,
        args.top_k,
        args.top_p,
        args.repetition_penalty,
        args.seed,
        tuple(args.stop),
    )
    sampling.params([])  # validates the flags before connecting
    spec = ModelSpec.parse(args.model)
    if args.command == "chat":
        from gateway.chat import run_chat

        return run_chat(list(peers), spec.source, spec.model_id, sampling, args.system)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    return asyncio.run(generate_once(peers, spec, prompt, sampling, args.chat, args.draft, args.num_draft_tokens))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "server":  # local admin socket: no swarm, no logging set-up needed
        from gateway import server_admin

        return server_admin.run(args)
    # The terminal commands keep the screen for the conversation: warnings only, unless asked.
    quiet = None if args.command == "gateway" else os.environ.get("POLLEN_LOG_LEVEL") or "WARNING"
    setup_logging(args.log_level or quiet)
    from swarm.errors import PollenError

    try:
        return _run(args)
    except KeyboardInterrupt:
        return 130
    except (PollenError, ValueError, OSError) as e:
        log.debug("failed", exc_info=True)
        sys.stderr.write(f"pollen {args.command}: {type(e).__name__}: {e}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
