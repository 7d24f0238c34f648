"""Issue 24 (4), MoE Hessians in chunks: a layer whose experts' Hessians exceed `experts.HESSIAN_BUDGET` sums and
solves them a chunk of experts at a time. The pass ends bitwise where the one with all of them at once ends (masks,
their order, weights, stats), for every MoE family and the top-up rule, and its peak memory, measured in bytes
the torch CPU allocator handed out (the profiler's memory events), follows the chunk, not the expert count, as
the memory estimate (`run.memory`) now counts it.
The 2-process equality is in tests/test_distributed_prune.py (case "moe-chunked"); streamed pruning refuses fused
experts (transformers converts their stored tensors on load), so it never chunks."""

from __future__ import annotations

import allocations
import pytest
import torch
import transformers as T
from test_families import BATCH, MOE_KINDS, calib, one_thread, tiny_model  # noqa: F401 (autouse fixture)

from sparsegpt.config.recipe import Recipe
from sparsegpt.core.architectures import decoder_layers
from sparsegpt.prune import experts
from sparsegpt.prune.sequential import PruneConfig, prune_model
from sparsegpt.run.memory import GIB, estimate

WIDE = 256  # the many-experts model's intermediate size: its down_proj Hessians are 256 x 256
EXPERT = 12 * WIDE * WIDE  # what the budget counts for one of them: float64 sum + float32 Hessian


def outcome(model, cfg: PruneConfig, ids: torch.Tensor) -> dict:
    result = prune_model(model, ids, cfg)
    return {"masks": dict(result.masks.masks), "order": list(result.masks.masks),
            "weights": decoder_layers(model).state_dict(),
            "stats": [{k: v for k, v in s.items() if k != "seconds"} for s in result.stats]}


def assert_same(got: dict, want: dict) -> None:
    assert got["order"] == want["order"] and got["stats"] == want["stats"]
    assert all(torch.equal(got["masks"][k], want["masks"][k]) for k in want["masks"])
    assert all(torch.equal(got["weights"][k], want["weights"][k]) for k in want["weights"])


def many_experts(experts_count: int) -> T.PreTrainedModel:
    """One Mixtral layer with `experts_count` experts, hidden 32, intermediate WIDE."""
    config = T.MixtralConfig(hidden_size=32, intermediate_size=WIDE, num_hidden_layers=1, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=512, max_position_embeddings=64, pad_token_id=0,
                             bos_token_id=1, eos_token_id=1, num_local_experts=experts_count, num_experts_per_tok=2)
    torch.manual_seed(0)
    return T.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


@pytest.mark.parametrize("kind", MOE_KINDS)
@pytest.mark.parametrize("min_tokens", [None, 0, 48, 1000])  # each matrix's width, none, about half, all topped up
def test_chunked_pass_equals_the_pass_with_every_expert_at_once(kind, min_tokens, monkeypatch):
    cfg = PruneConfig(sparsity=0.5, batch_size=BATCH, min_expert_tokens=min_tokens)
    whole = outcome(tiny_model(kind), cfg, calib())
    for budget in (1, 2 * 12 * 32 * 32):  # one expert a chunk; two of gate_up's, one of down_proj's
        monkeypatch.setattr(experts, "HESSIAN_BUDGET", budget)
        assert_same(outcome(tiny_model(kind), cfg, calib()), whole)


def test_many_experts_equal_in_any_chunks(monkeypatch):
    """64 experts, most under-calibrated: the pooled sum (added expert by expert) is the same in any chunks."""
    cfg = PruneConfig(sparsity=0.5, batch_size=BATCH, min_expert_tokens=4)
    whole = outcome(many_experts(64), cfg, calib())
    for chunk in (1, 5):
        monkeypatch.setattr(experts, "HESSIAN_BUDGET", chunk * EXPERT)
        assert_same(outcome(many_experts(64), cfg, calib()), whole)


def peak_bytes(experts_count: int, chunk: int, monkeypatch) -> int:
    """The most bytes the pass held at once beyond what was allocated before it (the model): the running sum of
    the torch CPU allocator's allocations and frees during `prune_model`, as the profiler records them."""
    monkeypatch.setattr(experts, "HESSIAN_BUDGET", chunk * EXPERT, raising=False)
    model, ids = many_experts(experts_count), calib()
    return allocations.peak_bytes(lambda: prune_model(model, ids, PruneConfig(sparsity=0.5, batch_size=BATCH)))


def test_peak_memory_follows_the_chunk_not_the_expert_count(monkeypatch):
    """Before the fix the pass held every expert's float64 sum and float32 Hessian at once: 66.7 EXPERTs at peak
    with 64 experts, 18.0 with 16, whatever the budget. Now 4 experts a chunk peak at ~4 EXPERTs with 16 or 64
    experts (every expert is topped up here: the pool and one replay's sum come on top), and 12 more experts in
    a chunk add their 12 float64 sums (8 · WIDE² each; their float32 Hessians replace the sums one by one)."""
    few, many = peak_bytes(16, 4, monkeypatch), peak_bytes(64, 4, monkeypatch)
    assert many <= 6 * EXPERT, f"64 experts, 4 a chunk: peak {many / EXPERT:.1f} expert Hessians"
    assert many - few <= EXPERT / 4, f"64 vs 16 experts: peak {many / EXPERT:.1f} vs {few / EXPERT:.1f} EXPERTs"
    bigger = peak_bytes(64, 16, monkeypatch)
    assert 12 * 8 * WIDE * WIDE * 0.95 <= bigger - many <= 12 * EXPERT, (many / EXPERT, bigger / EXPERT)


def test_memory_estimate_counts_one_chunk_of_expert_hessians():
    """Mixtral-8x22B's shape (8 experts, down_proj 16384 wide, 4 GiB: one expert a chunk): the estimate's
    Hessians are one chunk's, 32 · 16384² bytes at the peak (solving: its float32 Hessian 4, the pool 8, the solver
    20 · cols²), not all 8 experts' (21.8 GiB before), plus the cached expert inputs beside the activations."""
    config = T.MixtralConfig(hidden_size=6144, intermediate_size=16384, num_hidden_layers=56, num_attention_heads=48,
                             num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, vocab_size=32768)
    recipe = Recipe.model_validate({"name": "m", "model": "x", "dtype": "bfloat16",
                                    "data": {"calibration": "stdlib-docs"},
                                    "defaults": {"prune": {"nsamples": 128, "seqlen": 2048}},
                                    "stages": [{"name": "a", "target": 0.5, "finetune": False}]})
    prune = estimate(config, recipe)["prune"]
    assert prune["hessians"] * GIB == 32 * 16384**2
    assert prune["activations"] * GIB == 3 * 128 * 2048 * 6144 * 2
