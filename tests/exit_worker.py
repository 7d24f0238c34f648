"""One process of the exit test (`torchrun --nproc_per_node 2 tests/exit_worker.py MODE`): a few gloo collectives
on tensors Python holds, then the end of the script with no teardown of its own, as a user's job ends.

MODE "held": a reference to the group outlives it, as DeepSpeed ZeRO-3 keeps one on every parameter and engine;
MODE "deepspeed": `deepspeed.comm` imported after the group started (as transformers' `save_pretrained` does), which
pins the group in two default arguments. Either way the group's gloo worker threads are alive when the script ends;
without `sparsegpt.core.world`'s exit hook a thread still dropping the last collective's tensors while the
interpreter finalizes aborts the process ("terminate called without an active exception", SIGABRT).
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from sparsegpt.core.world import init_from_env

world = init_from_env()
torch.set_num_threads(1)
if sys.argv[1] == "held":
    held = dist.group.WORLD
else:
    import deepspeed.comm.torch  # noqa: F401
tensor = torch.ones(4)
for _ in range(5):
    world.all_reduce_sum(tensor)
assert tensor[0].item() == 2 ** 5
world.barrier()
