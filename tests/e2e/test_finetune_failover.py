"""Fine-tuning steps survive kill -9 of the servers they use (client_sdk.failover in remote.py): with two replicas
of every span, the server that ran the latest step is SIGKILLed while training steps keep running, then a
replacement starts for its blocks; the next victim is the replica that took over. Every Forward/Backward step
completes, and its logits and gradients (deep prompts + client LoRA) equal a local transformers/peft model's.

Before the time budget, a step that met the second victim raised MissingBlocks: both holders it knew were
banned and the client did not re-read the DHT, where the replacement had announced itself.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from transformers import LlamaForCausalLM

from client_sdk import DistributedModelForCausalLM
from tests.e2e.test_finetune import CHAINS, LocalTuned, Swarm, compare_grads, deep_lora_model
from tests.launcher import Proc, SwarmProcesses
from tests.tuning_fakes import RIGHT, TOL, causal_loss, make_tiny, padded
from tests.tuning_reference import rel_err

pytestmark = pytest.mark.e2e

ARGS = ("--num-threads", "1", "--throughput", "100", "--ttl", "6")
KILLS = 4  # alternating spans, each time the server the latest step used
STEPS_BETWEEN_KILLS = 2  # finished steps before the next kill
WAIT_S = 120.0


@pytest.fixture
def swarm(tmp_path: Path) -> Iterator[Swarm]:
    path = make_tiny(tmp_path / "tiny")
    with SwarmProcesses() as procs:
        try:
            dht = procs.start_dht()
            plan = {"0:2a": "0:2", "0:2b": "0:2", "2:4a": "2:4", "2:4b": "2:4"}
            servers = {
                n: procs.start_server(path, b, [dht.address], *ARGS, name=n, wait=False) for n, b in plan.items()
            }
            for server in servers.values():
                procs.wait_ready(server)
            yield Swarm(procs, dht, servers, path)
        except BaseException:
            print(procs.logs()[-20_000:])
            raise


def test_steps_complete_exactly_while_servers_are_killed(swarm: Swarm, tmp_path: Path) -> None:
    model: DistributedModelForCausalLM = deep_lora_model(swarm, 2)
    assert CHAINS[2] is None
    ref = LocalTuned(model, LlamaForCausalLM.from_pretrained(swarm.path), tmp_path / "adapter")
    ids = padded(RIGHT)
    ref_logits = ref.logits(ids, RIGHT)
    causal_loss(ref_logits, ids, RIGHT).backward()
    real = RIGHT.bool()

    steps = 0
    progress = threading.Condition()
    done = threading.Event()
    killed: list[str] = []
    errors: list[BaseException] = []

    def wait_steps(n: int) -> None:
        with progress:
            assert progress.wait_for(lambda: steps >= n or done.is_set(), WAIT_S), f"no step finished in {WAIT_S} s"

    def killer() -> None:
        """Kill the server that ran the latest step's hop for one span, start a replacement, repeat."""
        try:
            for k in range(KILLS):
                wait_steps(steps + STEPS_BETWEEN_KILLS)
                if done.is_set():
                    return
                trace = model.client.async_client.remote.last_trace
                assert trace is not None
                hop = trace.parts[0].hops[k % 2]  # 0:2, then 2:4, ...
                blocks = f"{hop.span.start}:{hop.span.end}"
                victim: Proc = next(p for p in swarm.servers.values() if p.address == hop.span.address)
                swarm.procs.stop(victim, signal.SIGKILL)
                killed.append(f"{victim.name} ({blocks}, peer {hop.span.peer_id[:8]})")
                name = f"{blocks}-r{k}"
                swarm.servers[name] = swarm.procs.start_server(
                    swarm.path, blocks, [swarm.dht.address], *ARGS, name=name
                )
                del swarm.servers[next(n for n, p in swarm.servers.items() if p is victim)]
            wait_steps(steps + STEPS_BETWEEN_KILLS)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)
        finally:
            done.set()

    thread = threading.Thread(target=killer, name="killer", daemon=True)
    thread.start()
    t0 = time.monotonic()
    try:
        while not done.is_set():
            model.zero_grad()
            out = model(ids, attention_mask=RIGHT)  # raises if a step does not complete
            causal_loss(out.logits, ids, RIGHT).backward()
            assert rel_err(out.logits[real], ref_logits[real]) < TOL, f"step {steps} logits"
            compare_grads(model, ref)
            with progress:
                steps += 1
                progress.notify_all()
    finally:
        done.set()
        thread.join(WAIT_S)
        model.client.close()
    assert not errors, errors
    assert len(killed) == KILLS, killed
    print(f"{steps} exact steps in {time.monotonic() - t0:.1f} s across {KILLS} kills: {', '.join(killed)}")
