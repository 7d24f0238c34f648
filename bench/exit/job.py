"""One process of the exit-abort count (`bench/exit/count.sh`): a tiny 2-process gloo job that ends the way a run does.

MODE: destroy (barrier + destroy_process_group), nodestroy (no teardown), ds-destroy (`deepspeed.comm` imported after
the group started, as transformers' `save_pretrained` does, then barrier + destroy), held-destroy (a reference to the
group kept, as DeepSpeed ZeRO-3 keeps one on every parameter, then barrier + destroy).
"""

import os

import torch
import torch.distributed as dist

from sparsegpt.core.world import init_from_env

mode = os.environ.get("MODE", "destroy")
world = init_from_env()
if mode.startswith("held-"):
    held = dist.group.WORLD
if mode.startswith("ds-"):
    import deepspeed.comm.torch  # noqa: F401
torch.set_num_threads(1)
tensor = torch.ones(4)
for _ in range(5):
    dist.all_reduce(tensor)
world.barrier()
if mode in ("destroy", "ds-destroy", "held-destroy"):
    dist.barrier()
    dist.destroy_process_group()
