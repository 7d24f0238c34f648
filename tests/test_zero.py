"""Real 2-process DeepSpeed training on CPU (gloo) under ZeRO-2, ZeRO-3 and ZeRO-3 + CPU offload, one
`accelerate launch` of tests/zero_worker.py per backend with the repository's accelerate recipes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparsegpt.masks import MaskSet
from zero_worker import magnitude_prune, tiny_llama, toy_ids, worker_config

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def single_process_losses():
    """The same 4 steps in one process (grad_accum 4 = the 2 processes' global batch of 8 rows)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    from sparsegpt.finetune import finetune

    model = tiny_llama()
    os.environ["SPARSEGPT_NO_PROGRESS"] = "1"
    losses = finetune(model, toy_ids(), magnitude_prune(model), worker_config(grad_accum=4),
                      accelerator=Accelerator()).losses
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return losses


@pytest.mark.parametrize("recipe", ["zero2", "zero3", "zero3_offload"])
def test_zero_training_keeps_masks_in_weights_master_copies_and_moments(recipe, tmp_path, single_process_losses):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
           "SPARSEGPT_NO_PROGRESS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", f"recipes/accelerate/{recipe}.yaml",
           "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(_free_port()),
           "tests/zero_worker.py", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in records] == [2, 2] and {r["stage"] for r in records} == {int(recipe[4])}
    expected_masks = magnitude_prune(tiny_llama())
    for runs in zip(*(r["runs"] for r in records)):
        assert runs[0]["losses"] == runs[1]["losses"]  # the reported loss is the all-reduced mean
        run = runs[0]
        assert run["optimizer"] == ("DeepSpeedCPUAdam" if "offload" in recipe else "AdamW")
        assert run["weights_checked"] == len(expected_masks.masks)
        assert all(v > 0 for v in run["kept_nonzero"].values())  # the gathered tensors are real
        if run["enforcement"] == "none":  # negative control: unguarded, the pruned weights revive
            assert all(v > 0 for v in run["masked_nonzero"].values())
            continue
        assert run["masked_nonzero"] == {"fp32": 0, "exp_avg": 0, "exp_avg_sq": 0}, run["enforcement"]
        assert run["fixed_after"] < run["fixed_before"]
        assert run["losses"] == pytest.approx(single_process_losses, rel=1e-4)
        from transformers import AutoModelForCausalLM

        folder = tmp_path / f"model-{run['enforcement']}"
        reloaded = AutoModelForCausalLM.from_pretrained(folder)
        saved = MaskSet.load(folder / "mask.safetensors")
        actual = MaskSet.from_model(reloaded)
        for name, mask in expected_masks.masks.items():
            assert torch.equal(saved.masks[name], mask) and torch.equal(actual.masks[name], mask), name
