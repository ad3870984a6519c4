"""Fake shard servers that keep the fine-tuning wire contract, for testing the client half without sockets.

They speak the proto messages (the real client code builds the requests and parses the replies) and compute
with the project's plain-torch blocks, adding deep prompts and LoRA with hooks exactly as proto/shard.proto's
Tuning describes: before block i, prompts[i] is added at the first pre_seq_len positions; every LoRA module
gives base(x) + scaling * (x @ A.T) @ B.T. `FakeClient` stands in for a SwarmClient (`async_client`, `run`).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import torch
from transformers import AutoConfig, LlamaForCausalLM

from client_sdk.config import ClientConfig
from client_sdk.directory import BlockRecords, SwarmView
from client_sdk.head import load_local_model
from client_sdk.pretrained import DistributedPreTrainedModel
from client_sdk.remote import RemoteCalls
from client_sdk.transport import ChannelPool
from swarm.blocks import BlockRange
from swarm.errors import DhtUnavailable
from swarm.model_files import Checkpoint
from swarm.models import Span, load_family, run_span
from swarm.pb import shard_pb2
from swarm.records import ServerRecord
from swarm.tensors import from_proto, to_proto
from tests.models import tiny_llama_config

MODEL_ID = "tiny-ft"
PAD = 0  # the tiny model's pad_token_id
TOL = 1e-5  # relative error allowed against a local model (fp32)


@dataclass
class FakeServer:
    peer: str
    start: int
    end: int
    span: Span  # all blocks of the model, loaded once
    throughput: float = 1.0
    dead: bool = False
    max_backward_rows: int = 0  # > 0: a Backward of more rows is refused (RESOURCE_EXHAUSTED), as over a limit
    calls: list[tuple[str, int, int, int]] = field(default_factory=list)  # (kind, start, end, rows)

    @property
    def address(self) -> str:
        return f"fake:{self.peer}"

    def record(self) -> ServerRecord:
        return ServerRecord(peer_id=self.peer, address=self.address, model_id=MODEL_ID, start=self.start,
                            end=self.end, throughput_tps=self.throughput)  # fmt: skip

    def handle(self, kind: str, request: Any) -> Any:
        if self.dead:
            raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "dead")
        a, b = request.blocks.start, request.blocks.end
        assert self.start <= a < b <= self.end and request.model_id == MODEL_ID
        hidden = from_proto(request.hidden)
        if kind == "backward" and 0 < self.max_backward_rows < hidden.shape[0]:
            meta = grpc.aio.Metadata()
            raise grpc.aio.AioRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, meta, meta, "over the Backward limit")
        self.calls.append((kind, a, b, hidden.shape[0]))
        mask = from_proto(request.attention_mask).bool() if request.HasField("attention_mask") else None
        tuning = request.tuning if request.HasField("tuning") else None
        grad = from_proto(request.grad_output) if kind == "backward" else None
        out, grads = self.compute(a, b, hidden, mask, tuning, grad)
        if kind == "forward":
            return shard_pb2.ForwardResponse(request_id=request.request_id, hidden=to_proto(out))
        reply = shard_pb2.BackwardResponse(request_id=request.request_id, grad_input=to_proto(grads[0]))
        i = 1
        if tuning is not None and tuning.HasField("prompts"):
            reply.grad_prompts.CopyFrom(to_proto(grads[1]))
            i = 2
        for lora, ga, gb in zip(tuning.lora if tuning else [], grads[i::2], grads[i + 1 :: 2], strict=True):
            reply.grad_lora.append(shard_pb2.LoraTensors(block=lora.block, module=lora.module, a=to_proto(ga),
                                                         b=to_proto(gb)))  # fmt: skip
        return reply

    def compute(
        self, a: int, b: int, hidden: torch.Tensor, mask: torch.Tensor | None, tuning: Any, grad: torch.Tensor | None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Blocks [a, b) with the contract's tuning: prompts[i] added before block a+i at the first positions,
        y = base(x) + scaling * (x @ A.T) @ B.T for every LoRA module."""
        sub = self.span.sub(BlockRange(a, b))
        x = hidden.clone().requires_grad_(grad is not None)
        leaves = [x]
        prompts = None
        if tuning is not None and tuning.HasField("prompts"):
            prompts = from_proto(tuning.prompts).requires_grad_(grad is not None)
            leaves.append(prompts)
        handles = []
        batch, seq = hidden.shape[:2]
        for i, layer in enumerate(sub.layers):
            if prompts is not None:

                def pre(_m: Any, args: tuple[Any, ...], i: int = i) -> Any:
                    h = args[0].view(batch, seq, -1)
                    n = prompts.shape[2]
                    h = torch.cat([h[:, :n] + prompts[i], h[:, n:]], dim=1)
                    return (h.reshape(batch * seq, -1), *args[1:])

                handles.append(layer.register_forward_pre_hook(pre))
            for lora in tuning.lora if tuning is not None else []:
                if lora.block != a + i:
                    continue
                la, lb = (
                    from_proto(lora.a).requires_grad_(grad is not None),
                    from_proto(lora.b).requires_grad_(grad is not None),
                )
                leaves += [la, lb]

                def post(_m: Any, args: tuple[Any, ...], out: torch.Tensor, la=la, lb=lb, s=lora.scaling) -> Any:
                    return out + s * ((args[0] @ la.T) @ lb.T)

                handles.append(layer.get_submodule(lora.module).register_forward_hook(post))
        try:
            with torch.enable_grad():
                out = run_span(sub, x, mask=mask)
                if grad is None:
                    return out.detach(), ()
                return out.detach(), torch.autograd.grad(out, leaves, grad)
        finally:
            for h in handles:
                h.remove()


class FakeCall:
    def __init__(self, server: FakeServer, kind: str) -> None:
        self.server, self.kind, self.reply = server, kind, None

    async def write(self, request: Any) -> None:
        self.reply = self.server.handle(self.kind, request)

    async def read(self) -> Any:
        return self.reply

    async def done_writing(self) -> None:
        pass

    def cancel(self) -> None:
        pass


class FakeStub:
    def __init__(self, server: FakeServer) -> None:
        self.server = server

    def Forward(self) -> FakeCall:  # noqa: N802 - the gRPC method names
        return FakeCall(self.server, "forward")

    def Backward(self) -> FakeCall:  # noqa: N802
        return FakeCall(self.server, "backward")


class FakePool(ChannelPool):
    """The client's channel pool with fake servers behind its stubs (`call_once` is the real one)."""

    def __init__(self, servers: list[FakeServer]) -> None:
        super().__init__()
        self.by_address = {s.address: s for s in servers}

    def shard(self, address: str) -> Any:
        return FakeStub(self.by_address[address])


class StaticDht:
    """The fake swarm's DHT: unreachable, so a re-read after a failure (client_sdk.failover) keeps the records."""

    async def batch_get(self, keys: list[str]) -> Any:
        raise DhtUnavailable("the fake swarm has no DHT")


class FakeAsyncClient:
    def __init__(self, path: Path, servers: list[FakeServer], config: ClientConfig) -> None:
        self.local = load_local_model(path, MODEL_ID)
        self.model_id = MODEL_ID
        self.wire_dtype = self.local.dtype
        blocks = self.local.num_blocks
        self.view = SwarmView(StaticDht(), MODEL_ID, blocks)  # type: ignore[arg-type]
        # records set by hand (signing them for a fake DHT would test nothing here); a re-read keeps them
        per_block = [{s.peer: s.record() for s in servers if s.start <= i < s.end} for i in range(blocks)]
        self.view.records = BlockRecords(per_block=per_block)
        self.view.updated_at = time.time()
        self.remote = RemoteCalls(FakePool(servers), self.view, MODEL_ID, config)  # type: ignore[arg-type]


class FakeClient:
    """What the model classes use of a SwarmClient: `async_client` and `run`."""

    def __init__(self, path: Path, servers: list[FakeServer], **options: Any) -> None:
        config = ClientConfig(max_view_age_s=1e9, **options)
        self.async_client = FakeAsyncClient(path, servers, config)
        self.loop = asyncio.new_event_loop()

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def close(self) -> None:
        self.loop.close()


@dataclass
class Swarm:
    path: Path
    servers: dict[str, FakeServer]

    def client(self, *peers: str, **options: Any) -> FakeClient:
        for s in self.servers.values():
            s.dead, s.calls, s.max_backward_rows = False, [], 0
        return FakeClient(self.path, [self.servers[p] for p in peers], **options)


def build(cls: type[DistributedPreTrainedModel], client: FakeClient, tuning_mode: str | None = None,
          pre_seq_len: int = 0, **config: Any) -> Any:  # fmt: skip
    """What load_distributed does, over a fake client."""
    hf = AutoConfig.from_pretrained(client.async_client.local.path, **config)
    hf.tuning_mode, hf.pre_seq_len, hf.active_adapter = tuning_mode, pre_seq_len, None
    return cls(hf, client)  # type: ignore[arg-type]


def make_swarm(path: Path) -> Swarm:
    """Fake servers over the model at `path`: a, c: 0:2; b: 2:4; d: 0:4; e: 0:1, f: 1:3, g: 3:4."""
    family = load_family(path)
    ckpt = Checkpoint(path)
    span = family.make_span([family.load_block(ckpt, i) for i in range(4)], BlockRange(0, 4))
    ranges = {"a": (0, 2), "b": (2, 4), "c": (0, 2), "d": (0, 4), "e": (0, 1), "f": (1, 3), "g": (3, 4)}
    return Swarm(path, {p: FakeServer(p, s, e, span) for p, (s, e) in ranges.items()})


def make_tiny(path: Path) -> Path:
    """A 4-block random Llama (hidden 64) whose config has pad_token_id = PAD (classification pools by it)."""
    torch.manual_seed(0)
    config = tiny_llama_config(4)
    config.pad_token_id = PAD
    LlamaForCausalLM(config).save_pretrained(path)
    return path


# A batch of three rows of 8 tokens, and masks for right and left padding.
IDS = torch.tensor([[5, 17, 42, 99, 3, 64, 23, 7], [9, 8, 7, 6, 5, 4, 3, 2], [11, 12, 13, 14, 15, 16, 17, 18]])
RIGHT = torch.tensor([[1] * 8, [1] * 5 + [0] * 3, [1] * 2 + [0] * 6])
LEFT = torch.tensor([[1] * 8, [0] * 3 + [1] * 5, [0] * 6 + [1] * 2])


def padded(mask: torch.Tensor | None) -> torch.Tensor:
    """IDS with PAD where the mask is 0 (the pad id is what classification pools by)."""
    return IDS if mask is None else IDS.masked_fill(mask == 0, PAD)


def causal_loss(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Next-token loss over real tokens predicted from real tokens (padding outputs are junk, differently so
    in every implementation)."""
    labels = ids[:, 1:]
    if mask is not None:
        labels = labels.masked_fill((mask[:, 1:] == 0) | (mask[:, :-1] == 0), -100)
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=-100)
