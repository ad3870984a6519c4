"""The gateway's cost: time to first token and tokens/s through `pollen gateway` (chat.petals.dev WebSocket, OpenAI
server-sent events) vs the SDK (AsyncSwarmClient.stream) on the same swarm in one run; and requests/s with 16
concurrent short chats (OpenAI /v1/chat/completions vs 16 concurrent SDK calls).

Setup per model: its own dht-node, 2 shard-servers splitting the blocks, and one `pollen gateway` process; this
process is the client of all three paths. Greedy decoding of a text prompt whose continuation has no EOS within
--tokens tokens, so every path makes the same tokens (checked: the texts must be equal). Rounds interleave the
paths in rotating order after one warm-up each; medians over rounds. TTFT: from the start of the request (for the
WebSocket: connecting and opening its session) to the first text piece, so every path includes opening the servers'
session, the prefill and one token; tokens/s: tokens / whole call.

Models: `tiny` (a 4-block random Llama with a tiny byte-level tokenizer, built on the fly) and SmolLM2 if
`models/smollm2-135m` exists (`make model`).

Usage: python bench/bench_gateway.py [--models tiny,models/smollm2-135m] [--repeats 5] [--tokens 32] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root: bench.common, this tree's code

from bench.common import (  # noqa: E402
    REPO,
    child_env,
    code_version,
    load_average,
    markdown,
    median,
    start_swarm,
    swarm_processes,
    use_threads,
)

PROMPTS = ["Once upon a time", "The capital of France is", "In a small village by the sea,", "hello world"]
CHATS = 16  # concurrent short chats
CHAT_TOKENS = 8
Call = Callable[[], Awaitable[tuple[float, float, str]]]  # -> (ttft_s, total_s, text)


def start_gateway(model: Path, dht: str, workdir: Path, threads: int) -> tuple[subprocess.Popen[bytes], str]:
    out = workdir / f"gateway-{model.name}.out"
    argv = [sys.executable, "-m", "gateway.cli", "gateway", "--initial-peers", dht, "--model", str(model),
            "--port", "0", "--max-concurrency", str(2 * CHATS), "--no-access-log"]  # fmt: skip
    env = {**os.environ, **child_env(threads), "PYTHONUNBUFFERED": "1"}
    with open(out, "wb") as f, open(workdir / f"gateway-{model.name}.err", "wb") as err:
        proc = subprocess.Popen(argv, stdout=f, stderr=err, env=env, start_new_session=True)
    deadline = time.monotonic() + 120
    while not (match := re.search(r"ready at (http://\S+)", out.read_text())):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"gateway did not start:\n{(workdir / f'gateway-{model.name}.err').read_text()}")
        time.sleep(0.05)
    return proc, match.group(1)


async def pick_prompt(client: object, tokens: int) -> str:
    """A prompt whose greedy continuation makes `tokens` tokens before any EOS (same work on every path)."""
    for prompt in PROMPTS:
        ids = client.tokenizer.encode(prompt)  # type: ignore[attr-defined]
        out = await client.generate(ids, max_new_tokens=tokens)  # type: ignore[attr-defined]
        if len(out) == tokens:
            return prompt
    raise SystemExit(f"every prompt's greedy continuation hits EOS within {tokens} tokens")


def sdk_call(client: object, prompt: str, tokens: int) -> Call:
    async def call() -> tuple[float, float, str]:
        t0 = time.perf_counter()
        first, text = 0.0, []
        async for piece in client.stream(prompt, max_new_tokens=tokens):  # type: ignore[attr-defined]
            first = first or time.perf_counter() - t0
            text.append(piece)
        return first, time.perf_counter() - t0, "".join(text)

    return call


def sse_call(http: object, model: str, prompt: str, tokens: int) -> Call:
    body = {"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True}

    async def call() -> tuple[float, float, str]:
        t0 = time.perf_counter()
        first, text = 0.0, []
        async with http.stream("POST", "/v1/completions", json=body) as response:  # type: ignore[attr-defined]
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                piece = json.loads(line[6:])["choices"][0]["text"]
                if piece:
                    first = first or time.perf_counter() - t0
                    text.append(piece)
        return first, time.perf_counter() - t0, "".join(text)

    return call


async def concurrent_chats(run_one: Callable[[], Awaitable[object]], total: int) -> tuple[float, float]:
    """`total` requests, CHATS at a time: (requests/s, median latency s)."""
    limit = asyncio.Semaphore(CHATS)
    latencies: list[float] = []

    async def one() -> None:
        async with limit:
            t0 = time.perf_counter()
            await run_one()
            latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(total)))
    return total / (time.perf_counter() - t0), median(latencies)


async def bench_model(
    model: Path, dht: str, url: str, args: argparse.Namespace
) -> tuple[list[list[str]], list[list[str]]]:
    import httpx

    from client_sdk import AsyncSwarmClient

    name = model.name
    async with AsyncSwarmClient([dht], model) as client, httpx.AsyncClient(base_url=url, timeout=600) as http:
        prompt = await pick_prompt(client, args.tokens)
        # the WebSocket turn ends when the session is full: prompt + tokens
        n_prompt = len(client.tokenizer.encode(prompt))  # type: ignore[union-attr]

        async def ws() -> tuple[float, float, str]:
            return await ws_call(url, name, prompt, n_prompt + args.tokens)

        paths: dict[str, Call] = {
            "SDK (AsyncSwarmClient.stream)": sdk_call(client, prompt, args.tokens),
            "gateway, WebSocket /api/v2/generate": ws,
            "gateway, SSE /v1/completions": sse_call(http, name, prompt, args.tokens),
        }
        results: dict[str, list[tuple[float, float]]] = {p: [] for p in paths}
        texts: dict[str, str] = {}
        for path, call in paths.items():  # warm-up
            texts[path] = (await call())[2]
        if len(set(texts.values())) != 1:
            raise SystemExit(f"the paths generated different texts: {texts}")
        order = list(paths)
        for r in range(args.repeats):
            for path in order[r % len(order) :] + order[: r % len(order)]:
                ttft, total, text = await paths[path]()
                assert text == texts[path], (path, text)
                results[path].append((ttft, total))
        rows = []
        for path, samples in results.items():
            ttft = median(s[0] for s in samples) * 1000
            tps = median(args.tokens / s[1] for s in samples)
            rows.append([name, path, f"{ttft:.1f}", f"{tps:.1f}"])

        # 16 concurrent short chats
        messages = [{"role": "user", "content": "hello, who are you?"}]
        ids = client.tokenizer.apply_chat_template(messages, add_generation_prompt=True)  # type: ignore[union-attr]
        body = {"model": name, "messages": messages, "max_tokens": CHAT_TOKENS, "temperature": 0}

        async def gateway_chat() -> object:
            response = await http.post("/v1/chat/completions", json=body)
            response.raise_for_status()
            return response

        async def sdk_chat() -> object:
            return await client.generate(ids, max_new_tokens=CHAT_TOKENS)

        total = CHATS * args.chat_rounds
        chat_rows = []
        for label, run in (("gateway, /v1/chat/completions", gateway_chat), ("SDK, generate()", sdk_chat)):
            await concurrent_chats(run, CHATS)  # warm-up
            rps, latency = await concurrent_chats(run, total)
            chat_rows.append([name, label, f"{rps:.2f}", f"{latency * 1000:.0f}", str(total)])
    return rows, chat_rows


async def ws_call(url: str, model: str, prompt: str, max_length: int) -> tuple[float, float, str]:
    """One chat.petals.dev WebSocket turn with a reply per token (its web client's way: max_new_tokens 1 and a
    stop sequence), ending when the session reaches `max_length` tokens."""
    from websockets.asyncio.client import connect

    t0 = time.perf_counter()  # a fresh chat: connect and open the session, as the other paths open theirs
    async with connect(url.replace("http://", "ws://") + "/api/v2/generate") as ws:
        await ws.send(json.dumps({"type": "open_inference_session", "model": model, "max_length": max_length}))
        assert json.loads(await ws.recv())["ok"]
        await ws.send(json.dumps({"type": "generate", "inputs": prompt, "max_new_tokens": 1,
                                  "stop_sequence": "\u0000never\u0000"}))  # fmt: skip
        first, text = 0.0, []
        while True:
            reply = json.loads(await ws.recv())
            assert reply["ok"], reply
            first = first or time.perf_counter() - t0
            text.append(reply["outputs"])
            if reply["stop"]:
                return first, time.perf_counter() - t0, "".join(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_models = "tiny" + (",models/smollm2-135m" if (REPO / "models/smollm2-135m").exists() else "")
    parser.add_argument("--models", default=default_models, help=f"comma-separated (default: {default_models})")
    parser.add_argument("--repeats", type=int, default=5, help="measured calls per path (default: 5)")
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per call (default: 32)")
    parser.add_argument("--chat-rounds", type=int, default=3, help="16-chat batches measured (default: 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (default: 1)")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny model, 2 repeats, 16 tokens")
    args = parser.parse_args()
    if args.quick:
        args.models, args.repeats, args.tokens, args.chat_rounds = "tiny", 2, 16, 1
    use_threads(args.threads)
    load_before = load_average()
    scratch = Path(tempfile.mkdtemp(prefix="pollen-bench-gateway-"))
    procs = swarm_processes(args.threads)
    gateways: list[subprocess.Popen[bytes]] = []
    rows, chat_rows = [], []
    try:
        for name in args.models.split(","):
            if name == "tiny":
                from tests.gateway.chat_model import make_chat_model

                model = make_chat_model(scratch / "tiny-chat")
            else:
                model = (REPO / name if not Path(name).is_absolute() else Path(name)).resolve()
            dht, _ = start_swarm(procs, model.name, model, 2, args.threads, "--throughput", "100")
            gateway, url = start_gateway(model, dht, scratch, args.threads)
            gateways.append(gateway)
            r, c = asyncio.run(bench_model(model, dht, url, args))
            rows += r
            chat_rows += c
    finally:
        for g in gateways:
            g.terminate()
            g.wait(30)
        procs.close()
    print(f"code: {code_version()}; load average before {load_before}, after {load_average()}")
    print(f"\n### Streaming, {args.tokens} greedy tokens (medians of {args.repeats})\n")
    print(markdown(["model", "path", "time to first token (ms)", "tokens/s"], rows))
    print(f"\n### {CHATS} concurrent short chats ({CHAT_TOKENS} tokens each)\n")
    print(markdown(["model", "path", "requests/s", "median latency (ms)", "requests"], chat_rows))


if __name__ == "__main__":
    main()
