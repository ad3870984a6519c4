"""Proto -> domain for the Shard RPCs: every check a request must pass before it reaches the worker, each
failure an InvalidRequest (or the PollenError that tells the client what to do) with a message naming the value.
Only what can change per step is checked per step.
"""

from __future__ import annotations

from typing import Any

import torch

from shard_server.backend import StepItem
from shard_server.session import Session
from shard_server.tuning import check_step_prompts, decode_prompts
from swarm.blocks import BlockRange
from swarm.errors import BlocksNotServed, CacheExhausted, InvalidRequest, ModelMismatch
from swarm.pb import common_pb2, shard_pb2
from swarm.tensors import dtype_name, from_proto

FLOATS = (torch.float32, torch.float16, torch.bfloat16)
MASK_DTYPES = (torch.int64, torch.int32, torch.bool)


def check_target(model_id: str, blocks: BlockRange, request: Any, any_sub_range: bool) -> BlockRange:
    """The blocks a request asks for: any sub-range of ours (Forward/Backward) or a prefix of it (sessions,
    whose caches are indexed by local layer 0..n-1). `request.model_id` must be ours."""
    if request.model_id != model_id:
        raise ModelMismatch(f"this server serves model {model_id!r}, not {request.model_id!r}")
    if not request.HasField("blocks"):
        return blocks  # absent = the whole held range
    start, end = request.blocks.start, request.blocks.end
    if end <= start:
        raise InvalidRequest(f"block range {start}:{end} is empty or reversed")
    if any_sub_range:
        if not (blocks.start <= start and end <= blocks.end):
            raise BlocksNotServed(f"blocks {start}:{end} are not served here: this server holds {blocks}")
    elif start != blocks.start or end > blocks.end:
        raise BlocksNotServed(
            f"blocks {start}:{end} cannot be served here: this server holds {blocks}; "
            f"an inference session must cover {blocks.start}:b with b <= {blocks.end}"
        )
    return BlockRange(start, end)


def decode_hidden(msg: common_pb2.Tensor, name: str, hidden_size: int) -> torch.Tensor:
    """A float [batch, seq, hidden_size] tensor, nothing empty."""
    t = from_proto(msg, name)
    if t.dtype not in FLOATS:
        raise InvalidRequest(f"{name} must be float32, float16 or bfloat16, got {dtype_name(t.dtype)}")
    if t.dim() != 3 or t.shape[2] != hidden_size or t.shape[0] == 0 or t.shape[1] == 0:
        raise InvalidRequest(f"{name} must have shape [batch, seq, {hidden_size}], got {list(t.shape)}")
    return t


def decode_mask(request: Any, batch: int, length: int) -> torch.Tensor | None:
    """The request's attention mask as bool [batch, length] (False = padding), or None."""
    if not request.HasField("attention_mask"):
        return None
    mask = from_proto(request.attention_mask, "attention_mask")
    if mask.dtype not in MASK_DTYPES:
        raise InvalidRequest(f"attention_mask must be int64, int32 or bool, got {dtype_name(mask.dtype)}")
    if tuple(mask.shape) != (batch, length):
        raise InvalidRequest(f"attention_mask must have shape [{batch}, {length}], got {list(mask.shape)}")
    return mask.bool()


def check_batch_tokens(hidden: torch.Tensor, max_batch_tokens: int) -> None:
    tokens = hidden.shape[0] * hidden.shape[1]
    if tokens > max_batch_tokens:
        raise CacheExhausted(
            f"request of {hidden.shape[0]}x{hidden.shape[1]} = {tokens} tokens is over this server's "
            f"max_batch_size of {max_batch_tokens} tokens; split it"
        )


def check_backward_tokens(hidden: torch.Tensor, max_backward_tokens: int) -> None:
    """Backward's activations grow with its tokens: over the limit, the client splits the batch."""
    tokens = hidden.shape[0] * hidden.shape[1]
    if tokens > max_backward_tokens:
        raise CacheExhausted(
            f"Backward of {hidden.shape[0]}x{hidden.shape[1]} = {tokens} tokens is over this server's limit of "
            f"{max_backward_tokens} tokens per Backward (its activation memory budget); split the batch"
        )


PUSH_TOKEN_BYTES = (16, 64)  # a push token is a random secret: long enough not to be guessed, short to compare


def check_open(msg: shard_pb2.InferenceOpen, inference_max_length: int) -> None:
    if msg.max_length == 0:
        raise InvalidRequest("open.max_length must be at least 1")
    low, high = PUSH_TOKEN_BYTES
    if msg.push_token and not low <= len(msg.push_token) <= high:
        raise InvalidRequest(f"open.push_token must be {low}-{high} random bytes, got {len(msg.push_token)}")
    if msg.max_length > inference_max_length:
        raise CacheExhausted(
            f"max_length {msg.max_length} is over this server's inference_max_length {inference_max_length}"
        )


def decode_step(
    session: Session, step: shard_pb2.InferenceStepInput, hidden_size: int, max_batch_tokens: int
) -> StepItem:
    """One step of `session` as the backend's StepItem (its position is explicit: at most the tokens cached)."""
    position = step.position
    if position > session.length:
        raise InvalidRequest(
            f"session {session.session_id}: step position {position} is ahead of the {session.length} "
            f"tokens in the cache"
        )
    hidden = decode_hidden(step.hidden, "hidden", hidden_size)
    check_batch_tokens(hidden, max_batch_tokens)
    batch, new_tokens = hidden.shape[0], hidden.shape[1]
    if batch != session.batch_size:
        raise InvalidRequest(
            f"session {session.session_id}: hidden has batch {batch}, the session was opened with "
            f"batch_size {session.batch_size}"
        )
    if position + new_tokens > session.max_length:
        raise InvalidRequest(
            f"session {session.session_id}: {new_tokens} tokens at position {position} would reach "
            f"{position + new_tokens}, over the session's max_length {session.max_length}"
        )
    mask = decode_mask(step, batch, position + new_tokens)
    reorder = None
    if step.HasField("hypo_ids"):
        reorder = from_proto(step.hypo_ids, "hypo_ids")
        if reorder.dtype != torch.int64 or tuple(reorder.shape) != (batch,):
            raise InvalidRequest(
                f"hypo_ids must be int64 of shape [{batch}], got {dtype_name(reorder.dtype)} {list(reorder.shape)}"
            )
        if not (0 <= int(reorder.min()) and int(reorder.max()) < batch):
            raise InvalidRequest(f"hypo_ids must be in [0, {batch}), got {reorder.tolist()}")
    prompts = None
    if step.HasField("prompts"):
        prompts = decode_prompts(step.prompts, session.blocks, hidden_size, batch)
        check_step_prompts(prompts, position, new_tokens)
        if step.next_servers:
            # a push carries no prompts, so the next server would miss its own: the client sends this step itself
            raise InvalidRequest("a step with prompts cannot be pushed on (next_servers): send it to each server")
    return StepItem(session.kv, position, hidden, mask, reorder, session.lora, prompts)
