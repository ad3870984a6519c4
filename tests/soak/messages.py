"""Valid request messages for every RPC of the shard server and the dht-node: the seeds the fuzzer mutates.

Each builder returns the whole message sequence of one call (one message for unary RPCs, `open` + steps for an
InferenceStep stream), drawn from a seeded `random.Random`, with the variations a real client sends: masks,
deep prompts, client LoRA, beams, several steps, pushes on to another (dead) loopback address.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from google.protobuf.message import Message

from swarm.blocks import block_key
from swarm.identity import Identity
from swarm.pb import common_pb2, dht_pb2, shard_pb2
from swarm.records import MODELS_KEY, ServerRecord
from swarm.tensors import to_proto

DEAD_ADDRESS = "127.0.0.1:9"  # the discard port: nothing listens there on this machine
FUZZ_MODEL = "fuzz-model"  # records the fuzzer stores live under this model id, away from the real ones
PUSH_TOKEN = bytes(range(32))  # the Push target's session accepts pushes with this token (InferenceOpen.push_token)
LORA_MODULES = {"self_attn.q_proj": (64, 64), "self_attn.v_proj": (64, 32), "mlp.down_proj": (128, 64)}


@dataclass(frozen=True)
class ShardTarget:
    model_id: str
    start: int
    end: int
    hidden_size: int


def _tensor(rng: random.Random, *shape: int, dtype: torch.dtype = torch.float32) -> common_pb2.Tensor:
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    if dtype.is_floating_point:
        return to_proto(torch.randn(*shape, generator=gen).to(dtype))
    return to_proto(torch.ones(*shape, dtype=dtype))


class ShardMessages:
    """Valid calls against one shard server; `push_session()` names a session open on it (for Push)."""

    def __init__(self, rng: random.Random, target: ShardTarget, push_session: Callable[[], str]) -> None:
        self.rng = rng
        self.t = target
        self.push_session = push_session

    def builders(self) -> dict[str, Callable[[], list[Message]]]:
        return {
            "Info": lambda: [shard_pb2.InfoRequest()],
            "Forward": self.forward,
            "Backward": self.backward,
            "InferenceStep": self.inference,
            "Push": self.push,
        }

    def _blocks(self, prefix: bool) -> common_pb2.BlockRange:
        t, rng = self.t, self.rng
        start = t.start if prefix else rng.randrange(t.start, t.end)
        return common_pb2.BlockRange(start=start, end=rng.randrange(start + 1, t.end + 1))

    def _tuning(self, blocks: common_pb2.BlockRange, batch: int, seq: int, prompts: bool) -> shard_pb2.Tuning:
        rng, h = self.rng, self.t.hidden_size
        tuning = shard_pb2.Tuning()
        if prompts:
            pre = rng.randrange(1, seq + 1)
            tuning.prompts.CopyFrom(_tensor(rng, blocks.end - blocks.start, rng.choice([1, batch]), pre, h))
        for module, (fan_in, fan_out) in rng.sample(sorted(LORA_MODULES.items()), rng.randrange(3)):
            rank = rng.choice([1, 4])
            tuning.lora.append(shard_pb2.LoraTensors(block=rng.randrange(blocks.start, blocks.end), module=module,
                                                     a=_tensor(rng, rank, fan_in), b=_tensor(rng, fan_out, rank),
                                                     scaling=2.0))  # fmt: skip
        return tuning

    def _mask(self, batch: int, length: int) -> common_pb2.Tensor:
        dtype = self.rng.choice([torch.int64, torch.int32, torch.bool])
        return _tensor(self.rng, batch, length, dtype=dtype)

    def forward(self) -> list[Message]:
        rng, h = self.rng, self.t.hidden_size
        batch, seq = rng.choice([1, 1, 2, 3]), rng.choice([1, 4, 9])
        blocks = self._blocks(prefix=False)
        msg = shard_pb2.ForwardRequest(model_id=self.t.model_id, blocks=blocks, hidden=_tensor(rng, batch, seq, h),
                                       request_id=f"r{rng.randrange(10**6)}")  # fmt: skip
        if rng.random() < 0.3:
            msg.attention_mask.CopyFrom(self._mask(batch, seq))
        if rng.random() < 0.4:
            msg.tuning.CopyFrom(self._tuning(blocks, batch, seq, prompts=rng.random() < 0.5))
        return [msg] * rng.choice([1, 1, 2])  # a stream may carry several requests

    def backward(self) -> list[Message]:
        rng, h = self.rng, self.t.hidden_size
        batch, seq = rng.choice([1, 2]), rng.choice([1, 4, 7])
        blocks = self._blocks(prefix=False)
        msg = shard_pb2.BackwardRequest(model_id=self.t.model_id, blocks=blocks, hidden=_tensor(rng, batch, seq, h),
                                        grad_output=_tensor(rng, batch, seq, h), request_id="b")  # fmt: skip
        if rng.random() < 0.3:
            msg.attention_mask.CopyFrom(self._mask(batch, seq))
        if rng.random() < 0.5:
            msg.tuning.CopyFrom(self._tuning(blocks, batch, seq, prompts=rng.random() < 0.6))
        return [msg]

    def _open(self, batch: int, session_id: str) -> shard_pb2.InferenceRequest:
        blocks = self._blocks(prefix=True)
        msg = shard_pb2.InferenceOpen(model_id=self.t.model_id, blocks=blocks, max_length=self.rng.choice([16, 64]),
                                      session_id=session_id, batch_size=batch)  # fmt: skip
        if self.rng.random() < 0.5:
            msg.push_token = self.rng.randbytes(self.rng.choice([16, 32]))
        if self.rng.random() < 0.2:
            msg.tuning.CopyFrom(self._tuning(blocks, batch, 1, prompts=False))
        return shard_pb2.InferenceRequest(open=msg)

    def step(self, batch: int, position: int, tokens: int, push: bool) -> shard_pb2.InferenceStepInput:
        rng, h = self.rng, self.t.hidden_size
        step = shard_pb2.InferenceStepInput(step_id=f"s{position}", position=position,
                                            hidden=_tensor(rng, batch, tokens, h))  # fmt: skip
        if rng.random() < 0.3:
            step.attention_mask.CopyFrom(self._mask(batch, position + tokens))
        if batch > 1 and rng.random() < 0.5:
            step.hypo_ids.CopyFrom(to_proto(torch.tensor([rng.randrange(batch) for _ in range(batch)])))
        if push:  # the next server is a dead address: the push fails and the client gets push_failed
            step.next_servers.append(shard_pb2.NextHop(address=DEAD_ADDRESS, session_id="next", push_token=PUSH_TOKEN))
        return step

    def inference(self) -> list[Message]:
        rng = self.rng
        batch = rng.choice([1, 1, 2])
        prefill = rng.choice([1, 3, 6])
        msgs: list[Message] = [self._open(batch, f"fuzz-{rng.randrange(10**9):x}")]
        position = 0
        for tokens in [prefill] + [1] * rng.choice([0, 1, 2]):
            msgs.append(shard_pb2.InferenceRequest(step=self.step(batch, position, tokens, rng.random() < 0.1)))
            position += tokens
        return msgs

    def open_request(self, session_id: str) -> shard_pb2.InferenceRequest:
        """A plain session (batch 1, the whole held range) that takes pushes with PUSH_TOKEN: the Push target."""
        blocks = common_pb2.BlockRange(start=self.t.start, end=self.t.end)
        return shard_pb2.InferenceRequest(open=shard_pb2.InferenceOpen(
            model_id=self.t.model_id, blocks=blocks, max_length=64, session_id=session_id, batch_size=1,
            push_token=PUSH_TOKEN))  # fmt: skip

    def push(self) -> list[Message]:
        step = self.step(1, 0, self.rng.choice([1, 2, 5]), push=False)
        return [shard_pb2.PushRequest(session_id=self.push_session(), step=step, push_token=PUSH_TOKEN)]


class DhtMessages:
    """Valid calls against a dht-node's gRPC service: signed stores under FUZZ_MODEL, lookups of real keys."""

    def __init__(self, rng: random.Random, real_model: str) -> None:
        self.rng = rng
        self.identities = [Identity.generate() for _ in range(3)]
        self.keys = [block_key(real_model, 0), block_key(FUZZ_MODEL, 1), MODELS_KEY, "not.a.pollen.key"]

    def builders(self) -> dict[str, Callable[[], list[Message]]]:
        return {
            "Store": self.store,
            "Get": lambda: [dht_pb2.GetRequest(key=self.rng.choice(self.keys))],
            "BatchGet": lambda: [dht_pb2.BatchGetRequest(keys=self.rng.sample(self.keys, self.rng.randrange(1, 4)))],
            "Ping": lambda: [dht_pb2.PingRequest()],
            "SpeedTest": lambda: [
                dht_pb2.SpeedTestRequest(
                    payload=self.rng.randbytes(self.rng.choice([0, 64, 4096])),
                    reply_bytes=self.rng.choice([0, 64, 10**6]),
                )
            ],  # fmt: skip
        }

    def store(self) -> list[Message]:
        rng = self.rng
        identity = rng.choice(self.identities)
        block = rng.randrange(4)
        key = block_key(FUZZ_MODEL, block)
        value = ServerRecord(peer_id=identity.peer_id, address=DEAD_ADDRESS, model_id=FUZZ_MODEL, start=block,
                             end=block + 1).encode()  # fmt: skip
        expiration = time.time() + rng.choice([30.0, 600.0])
        item = dht_pb2.SubkeyValue(subkey=identity.peer_id, value=value, expiration=expiration,
                                   public_key=identity.public_key,
                                   signature=identity.sign(key, identity.peer_id, value, expiration))  # fmt: skip
        return [dht_pb2.StoreRequest(key=key, items=[item])]
