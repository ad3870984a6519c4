"""int8 / nf4 blocks vs the unquantized ones on models with trained weights: top-1 agreement of next-token
predictions (every position of a text, teacher-forced, all blocks quantized, local head in float32).

Why trained weights: on a random model the next-token distribution is nearly flat, so the argmax flips under any
noise and agreement measures nothing. Two models:

* `trained-tiny` (always, also in CI): a 2-block Llama (hidden 64) trained here for ~300 AdamW steps on the
  characters of PROSE below (written for this test). It predicts that text with >80 % accuracy, i.e. its
  predictions are peaked the way a trained model's are on familiar text, and its weights have gone through
  real optimisation (not a rescaled random init). About 10-25 s of training on 2 busy cores.
* `smollm2` (only when `make model` has created models/smollm2-135m): the real SmolLM2-135M-Instruct, 30
  blocks. Caveat: that folder is converted from a Q4_1 GGUF, so its weights already sit on a 4-bit grid and
  NF4 quantizes them a second time onto a different grid; it is also a small model whose predictions on
  plain prose are flat (median top-1 probability ~0.3), where near-ties flip easily. Hence two metrics:
  agreement over all positions and over the positions where float32 is confident (top-1 probability >= 0.5).

Measured (this machine, CPU, bitsandbytes 0.50.2; int8 with float32 compute, nf4 with bfloat16 compute):
  trained-tiny, 254 positions: int8 99.2-99.6 %, nf4 96.1-97.2 %.
  smollm2, 300 positions:      int8 92.0 % (all) / 100 % (65 confident), nf4 71.7 % (all) / 92.3 % (confident).
Thresholds below sit a few points under those numbers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from shard_server.loader import ModelInfo, inspect_model, load_span
from swarm.blocks import BlockRange
from swarm.model_files import Checkpoint
from swarm.models import ClientHead, run_span

pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install 'pollen-swarm[quant]')")

SMOLLM2 = Path(__file__).resolve().parents[2] / "models" / "smollm2-135m"

PROSE = """Pollen moves between flowers on the legs of bees, and the field is richer for every trip they make.
A hive keeps its own accounts: nectar in, honey out, wax for the comb, and a queen who lays through the warm months.
Workers that forage in the morning rest in the afternoon, and the young ones fan the entrance to keep the air moving.
When the clover blooms the colony grows quickly; when rain keeps the foragers home, the stores fall.
Beekeepers learn to read the frames the way sailors read the sky, looking for capped cells, fresh eggs and new nectar.
A strong colony in spring may split in two, and half the bees leave with the old queen to find a hollow tree.
The swarm hangs from a branch for an hour or a day while scouts search the valley and report back with a dance.
Each scout dances for the site she found, the better sites get longer dances, and slowly the cluster agrees on one home.
Then the swarm lifts into the air as a single loud cloud, drifts across the orchard and pours into the chosen opening.
Within a week the new comb is white and full of eggs, and the foragers are back among the flowers.
In the old hive a new queen emerges, flies out to mate, and returns to take up the work of the colony.
The cycle repeats every year, and the meadow, the orchard and the garden all depend on it without ever noticing.
"""

CPU = torch.device("cpu")
CONFIDENT = 0.5  # float32 top-1 probability above which a prediction counts as confident

# (model, quant) -> (min agreement over all positions, min agreement over confident positions)
THRESHOLDS = {
    ("trained-tiny", "int8"): (0.95, 0.95),
    ("trained-tiny", "nf4"): (0.92, 0.95),
    ("smollm2", "int8"): (0.88, 0.95),
    ("smollm2", "nf4"): (0.65, 0.85),
}
COMPUTE_DTYPE = {"int8": torch.float32, "nf4": torch.bfloat16}


def char_ids(text: str) -> torch.Tensor:
    return torch.tensor([min(ord(c), 127) for c in text])


def train_tiny(path: Path, steps: int = 300, seq: int = 64, batch: int = 8) -> Path:
    """A 2-block char-level Llama fitted to PROSE (deterministic: fixed seeds, one thread)."""
    data = char_ids(PROSE)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)  # fmt: skip
    model = LlamaForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=steps)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=g)
        x = torch.stack([data[i : i + seq + 1] for i in starts])  # [batch, seq + 1]
        loss = F.cross_entropy(model(x[:, :-1]).logits.reshape(-1, 128), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
    model.save_pretrained(path, safe_serialization=True)
    return path


@dataclass
class Case:
    name: str
    info: ModelInfo
    head: ClientHead
    ids: torch.Tensor  # [windows, tokens]
    reference: torch.Tensor  # float32 logits [windows, tokens, vocab]

    def logits(self, quant: str, device: torch.device = CPU) -> torch.Tensor:
        dtype = COMPUTE_DTYPE[quant] if quant != "none" else torch.float32
        span = load_span(self.info, BlockRange(0, self.info.family.num_blocks), device, dtype, quant=quant)
        with torch.inference_mode():
            hidden = run_span(span, self.head.embed(self.ids).to(device=device, dtype=dtype))
            return self.head.logits(hidden.float().cpu())


@pytest.fixture(scope="module", autouse=True)
def threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=["trained-tiny", "smollm2"])
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Case:
    if request.param == "smollm2":
        if not (SMOLLM2 / "model.safetensors").is_file():
            pytest.skip(f"{SMOLLM2} not found (created by `make model`)")
        from transformers import AutoTokenizer

        path = SMOLLM2
        ids = AutoTokenizer.from_pretrained(path)(PROSE, return_tensors="pt").input_ids[:, :300]
    else:
        t0 = time.perf_counter()
        with torch.enable_grad():
            path = train_tiny(tmp_path_factory.mktemp("trained-tiny"))
        print(f"trained the tiny model in {time.perf_counter() - t0:.1f} s")
        ids = char_ids(PROSE)[: 4 * 64].reshape(4, 64)  # windows as long as the training sequences
    info = inspect_model(str(path), BlockRange(0, 1))
    head = info.family.load_head(Checkpoint(info.path))
    case = Case(request.param, info, head, ids, torch.empty(0))
    case.reference = case.logits("none")
    return case


def agreement(case: Case, logits: torch.Tensor) -> tuple[float, float, int]:
    """(top-1 agreement over all positions, over confident positions, number of confident positions)."""
    ref = case.reference.flatten(0, 1)
    same = logits.flatten(0, 1).argmax(-1) == ref.argmax(-1)
    confident = ref.softmax(-1).amax(-1) >= CONFIDENT
    return same.float().mean().item(), same[confident].float().mean().item(), int(confident.sum())


def test_reference_is_trained_like(case: Case) -> None:
    """The float32 model must really be predicting the text, or agreement would be meaningless."""
    ref = case.reference
    accuracy = (ref[:, :-1].argmax(-1) == case.ids[:, 1:]).float().mean().item()
    print(f"{case.name}: float32 next-token accuracy on the text {accuracy:.1%}")
    assert accuracy >= (0.7 if case.name == "trained-tiny" else 0.2)


@pytest.mark.parametrize("quant", ["int8", "nf4"])
def test_quantized_top1_agrees_with_unquantized(case: Case, quant: str) -> None:
    all_pos, confident, n_confident = agreement(case, case.logits(quant))
    positions = case.reference.shape[0] * case.reference.shape[1]
    print(f"{case.name} {quant}: top-1 agreement {all_pos:.1%} over {positions} positions, "
          f"{confident:.1%} over {n_confident} confident ones")  # fmt: skip
    assert positions >= 200
    min_all, min_confident = THRESHOLDS[(case.name, quant)]
    assert all_pos >= min_all and confident >= min_confident


@pytest.mark.gpu
@pytest.mark.parametrize("quant", ["int8", "nf4"])
def test_quantized_top1_agrees_on_cuda(case: Case, quant: str) -> None:
    """Same check with the blocks quantized by bitsandbytes' CUDA kernels (skipped without a GPU)."""
    all_pos, confident, _ = agreement(case, case.logits(quant, torch.device("cuda")))
    min_all, min_confident = THRESHOLDS[(case.name, quant)]
    assert all_pos >= min_all and confident >= min_confident
