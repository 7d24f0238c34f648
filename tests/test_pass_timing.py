"""The pruning pass's phase timers: every phase of `distributed.PHASES` is recorded, the nested ones (Hessian sums
inside the forwards, factorizations inside the solves) never exceed their container, and a pass logs them once."""

from __future__ import annotations

import logging

import torch

from sparsegpt.prune.distributed import PHASES
from sparsegpt.prune.sequential import PruneConfig, prune_model


def test_the_pass_records_and_logs_every_phase(make_tiny_model, caplog):
    model = make_tiny_model("llama")
    ids = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(0))
    with caplog.at_level(logging.INFO, logger="sparsegpt.prune.distributed"):
        result = prune_model(model, ids, PruneConfig(sparsity=0.5, batch_size=2, blocksize=16))
    (rank,) = result.world["ranks"]
    sec = rank["seconds"]
    assert tuple(sec) == PHASES
    assert all(sec[k] > 0 for k in ("capture", "forward", "hessian", "solve", "factor", "propagate"))
    assert sec["hessian"] <= sec["forward"] and sec["factor"] <= sec["solve"]
    assert sum(v for k, v in sec.items() if k not in ("hessian", "factor")) <= result.seconds
    assert caplog.text.count("pass phases (rank 0): capture") == 1
