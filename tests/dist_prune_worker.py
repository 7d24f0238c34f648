"""One process of the distributed pruning test (`torchrun --nproc_per_node 2 tests/dist_prune_worker.py OUT [DIR]`),
and the cases it runs, which tests/test_distributed_prune.py also prunes in one process as the reference.

Each case builds the same tiny random model (from a config, seeded) and calibration set on every rank and calls
`prune_model` in the launch's process group (joined with `world.init_from_env`, as `sparsegpt prune` does); the
rank saves its masks, decoder weights, stats and world record to OUT/rank{r}.pt and records which layers it
entered and left (the `LayerAccess` seam); a case in BUDGETS runs under that expert Hessian budget (chunked
experts). A solve that fails on rank 1 only must fail on both ranks (the messages in OUT/failure-rank{r}.json),
and the group must still work afterwards. With DIR (a saved tiny model with a tokenizer) it also runs `sparsegpt
prune` twice in the same group: once normally into OUT/cli, once with a bad flag (its return code per rank in
OUT/cli-rank{r}.json).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import transformers as T

from sparsegpt import cli
from sparsegpt.core.architectures import decoder_layers
from sparsegpt.core.errors import UserError
from sparsegpt.core.world import init_from_env, leave
from sparsegpt.prune import experts, sequential
from sparsegpt.prune.reconstruct import ReconstructConfig
from sparsegpt.prune.sequential import LayerAccess, PruneConfig, prune_model

VOCAB = 128
BASE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=1, max_position_embeddings=64)
CONFIGS = {
    "llama": lambda: T.LlamaConfig(**BASE),
    "opt": lambda: T.OPTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
                               word_embed_proj_dim=32, max_position_embeddings=64, vocab_size=VOCAB, pad_token_id=0,
                               bos_token_id=1, eos_token_id=1, dropout=0.0, attention_dropout=0.0),
    "qwen2_moe": lambda: T.Qwen2MoeConfig(**BASE, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                          shared_expert_intermediate_size=32),
}
# name -> (model kind, calibration rows, prune config); 7 rows in batches of 3 give the ranks (4 + 3 rows) other
# batches than one process (3 + 3 + 1): the Hessian sums differ in float summation order only
CASES = {
    "llama": ("llama", 7, PruneConfig(sparsity=0.5, batch_size=3)),
    "opt": ("opt", 7, PruneConfig(sparsity=0.5, batch_size=3)),
    "llama-2of4": ("llama", 8, PruneConfig(prune_n=2, prune_m=4, batch_size=4)),  # shares = the batches
    "llama-owl": ("llama", 7, PruneConfig(sparsity=0.6, allocation="owl", owl_lambda=0.1, batch_size=3)),
    "moe": ("qwen2_moe", 7, PruneConfig(sparsity=0.5, batch_size=3, min_expert_tokens=64)),  # all topped up
    "moe-chunked": ("qwen2_moe", 7, PruneConfig(sparsity=0.5, batch_size=3, min_expert_tokens=64)),  # BUDGETS
    "one-row": ("llama", 1, PruneConfig(sparsity=0.5)),               # rank 1 has no calibration row
    "one-group": ("llama", 7, PruneConfig(sparsity=0.5, batch_size=3, include=r"down_proj")),  # rank 1 solves none
    # one forward a layer over each rank's 4 or 3 rows; every group's Hessian all-reduced inside its hook
    "llama-trueseq": ("llama", 7, PruneConfig(sparsity=0.5, true_sequential=True)),
    # reconstruction: step chunk 1 (rows 3-5) is split over the ranks (4 + 3 rows), so the all-reduced gradient
    # sums what one process sums in one piece; pruned inputs with forward batches of 2 inside steps of 4 rows
    "llama-recon": ("llama", 7, PruneConfig(sparsity=0.5, batch_size=3, reconstruct=ReconstructConfig(
        passes=2, lr=1e-3, batch=3, inputs="dense"))),
    "llama-recon-pruned": ("llama", 7, PruneConfig(sparsity=0.5, batch_size=2, reconstruct=ReconstructConfig(
        passes=2, lr=1e-3, batch=4, inputs="pruned"))),
    "one-row-recon": ("llama", 1, PruneConfig(sparsity=0.5, reconstruct=ReconstructConfig(
        passes=2, lr=1e-3, batch=1))),
}
SEQLEN = 12
BUDGETS = {"moe-chunked": 1}  # experts.HESSIAN_BUDGET of a case: 1 byte = the expert Hessians one expert at a time


def prune(case: str, model: torch.nn.Module, ids: torch.Tensor, cfg: PruneConfig, **kwargs):
    """`prune_model` under the case's expert Hessian budget (the default where it sets none)."""
    default = experts.HESSIAN_BUDGET
    experts.HESSIAN_BUDGET = BUDGETS.get(case, default)
    try:
        return prune_model(model, ids, cfg, **kwargs)
    finally:
        experts.HESSIAN_BUDGET = default


def build(case: str) -> tuple[torch.nn.Module, torch.Tensor, PruneConfig]:
    """The case's model (seed 0), calibration rows (seed 1) and config: the same on every rank and in the test."""
    kind, rows, cfg = CASES[case]
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(CONFIGS[kind](), dtype=torch.float32).eval()
    ids = torch.randint(2, VOCAB, (rows, SEQLEN), generator=torch.Generator().manual_seed(1))
    return model, ids, cfg


def outcome(model, result) -> dict:
    """What the test compares: masks, decoder weights, stats, world, per-layer reconstruction stats."""
    return {"masks": dict(result.masks.masks), "weights": decoder_layers(model).state_dict(),
            "stats": result.stats, "world": result.world, "reconstruction": result.reconstruction}


class Recording(LayerAccess):
    """Records every enter/leave, in order."""

    def __init__(self):
        self.calls = []

    def enter(self, index, layer):
        self.calls.append(("enter", index))

    def leave(self, index, layer, *, pruned):
        self.calls.append(("leave", index, pruned))


def fail_on_one_rank() -> str:
    """Prune with layer 1's gate/up solve raising (rank 1's: `balance` gives rank 0 down_proj and o_proj); the
    UserError each rank ends with."""
    solve = sequential._solve_group

    def failing(group, *args, **kwargs):
        if group[0].endswith("layers.1.mlp.gate_proj"):
            raise UserError(f"synthetic failure solving {group[0]}")
        return solve(group, *args, **kwargs)

    sequential._solve_group = failing
    try:
        model, ids, cfg = build("llama")
        prune_model(model, ids, cfg)
    except UserError as e:
        return str(e)
    finally:
        sequential._solve_group = solve
    return "no error"


def main(out: Path, model_dir: str | None) -> None:
    world = init_from_env()
    torch.set_num_threads(1)
    results = {}
    for case in CASES:
        model, ids, cfg = build(case)
        access = Recording()
        results[case] = outcome(model, prune(case, model, ids, cfg, access=access))
        results[case]["access"] = access.calls
    torch.save(results, out / f"rank{world.rank}.pt")
    (out / f"failure-rank{world.rank}.json").write_text(json.dumps(fail_on_one_rank()))
    if model_dir:
        common = ["prune", "--model", model_dir, "--calib", "stdlib-docs", "--seqlen", "16", "--batch-size", "3"]
        good = cli.main([*common, "--sparsity", "0.5", "--nsamples", "5", "--out", str(out / "cli")])
        bad = cli.main([*common, "--sparsity", "0.5", "--nsamples", "0", "--out", str(out / "cli-bad")])
        (out / f"cli-rank{world.rank}.json").write_text(json.dumps({"good": good, "bad": bad}))
    dist.barrier()  # every rank done with collectives
    leave()  # the group's gloo threads joined before the interpreter finalizes (core/world.py says why)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else None)
