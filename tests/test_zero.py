"""Real 2-process training on CPU (gloo) under ZeRO-2, ZeRO-3, ZeRO-3 + CPU offload (one `accelerate launch` of
tests/zero_worker.py per backend with the repository's accelerate recipes) and plain DDP (torchrun: accelerate
launch starts only one process on a CPU-only machine)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from pydoc_data.topics import topics

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from launching import free_port
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from zero_worker import magnitude_prune, tiny_llama, toy_ids, worker_config

from sparsegpt.core.masks import MaskSet
from sparsegpt.heal.finetune import finetune
from sparsegpt.storage.models import load_model, save_model

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def single_process_losses():
    """The same 4 steps in one process (grad_accum 4 = the 2 processes' global batch of 8 rows)."""
    model = tiny_llama()
    os.environ["SPARSEGPT_NO_PROGRESS"] = "1"
    losses = finetune(model, toy_ids(), magnitude_prune(model), worker_config(grad_accum=4),
                      accelerator=Accelerator()).losses
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return losses


def _launch(recipe: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    """`accelerate launch` 2 CPU processes with recipes/accelerate/{recipe}.yaml (DeepSpeed over gloo)."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
           "SPARSEGPT_NO_PROGRESS": "1", "PYTHONWARNINGS": "ignore", **env}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", f"recipes/accelerate/{recipe}.yaml",
           "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(free_port()), *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    """2 CPU processes of plain DDP (ACCELERATE_USE_CPU makes accelerate use gloo)."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
           "SPARSEGPT_NO_PROGRESS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)


@pytest.mark.parametrize("recipe", ["zero2", "zero3", "zero3_offload", "ddp"])
def test_training_keeps_masks_in_weights_master_copies_and_moments(recipe, tmp_path, single_process_losses):
    args = ("tests/zero_worker.py", str(tmp_path))
    proc = _torchrun(*args) if recipe == "ddp" else _launch(recipe, *args)
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in records] == [2, 2]
    assert {r["backend"] for r in records} == {recipe.removesuffix("_offload")}
    expected_masks = magnitude_prune(tiny_llama())
    for runs in zip(*(r["runs"] for r in records)):
        assert runs[0]["losses"] == runs[1]["losses"]  # the reported loss is the all-reduced mean
        run = runs[0]
        assert run["optimizer"] == ("DeepSpeedCPUAdam" if "offload" in recipe else "AdamW")
        assert run["weights_checked"] == len(expected_masks.masks)
        _check_held_mask_bytes(recipe, run)
        assert all(v > 0 for v in run["kept_nonzero"].values())  # the gathered tensors are real
        if run["enforcement"] == "none":  # negative control: unguarded, the pruned weights revive
            assert all(v > 0 for v in run["masked_nonzero"].values())
            continue
        assert run["masked_nonzero"] == {"fp32": 0, "exp_avg": 0, "exp_avg_sq": 0}, run["enforcement"]
        assert run["fixed_after"] < run["fixed_before"]
        assert run["losses"] == pytest.approx(single_process_losses, rel=1e-4)
        folder = tmp_path / f"model-{run['enforcement']}"
        reloaded = AutoModelForCausalLM.from_pretrained(folder)
        saved = MaskSet.load(folder / "mask.safetensors")
        actual = MaskSet.from_model(reloaded)
        for name, mask in expected_masks.masks.items():
            assert torch.equal(saved.masks[name], mask) and torch.equal(actual.masks[name], mask), name


def _check_held_mask_bytes(recipe: str, run: dict) -> None:
    """The mask tensors the hooks and the enforcer hold, per rank: under ZeRO-3 this rank's share of the packed bits
    (at most half of one 1-bit mask of the pruned linears plus one layer's unpacked mask; in fact the half plus a
    byte of rounding per parameter); elsewhere (DDP, ZeRO-2: every rank holds every weight) one packed mask per
    parameter, shared by hook and enforcer: 1 bit per weight, not the 2-4 B of a keep in the weight's dtype."""
    sizes, held = run["mask_sizes"], max(run["held_bytes"])
    assert len(run["held_bytes"]) == (1 if run["enforcement"] in ("none", "hooks") else 1 + worker_config().steps)
    if recipe.startswith("zero3"):
        assert held <= sizes["full_bits"] / 2 + sizes["layer_unpacked"]
        assert held <= sizes["full_bits"] / 2 + sizes["params"]  # shrinks with the world
    else:
        assert held == sizes["full_bits"] < sizes["full_unpacked"] / 16
    if recipe == "zero3_offload" and run["enforcement"] in ("step", "full"):  # the fp32 partition zeroed in place
        assert run["safe_fp32_calls"] == 0
    elif recipe == "zero3" and run["enforcement"] in ("step", "full"):  # no offload: DeepSpeed's accessors (views)
        assert run["safe_fp32_calls"] > 0


def test_zero3_cli_resume_from_a_mid_run_checkpoint_is_bitwise(tiny_llama_dir, tmp_path):
    """`sparsegpt finetune` under ZeRO-3; a second run given only the first run's step-2 checkpoint (and a step-4
    folder without manifest, as a kill during the save leaves it) resumes to the same model bit for bit."""
    model, tokenizer = load_model(tiny_llama_dir)
    masks = magnitude_prune(model)
    save_model(model, tokenizer, tmp_path / "pruned")
    (tmp_path / "train.txt").write_text("\n\n".join(list(topics.values())[:12]))

    def cli(out: str) -> subprocess.CompletedProcess:
        return _launch("zero3", "-m", "sparsegpt.cli", "finetune", "--model", str(tmp_path / "pruned"),
                       "--data", str(tmp_path / "train.txt"), "--steps", "4", "--seqlen", "32", "--micro-batch", "2",
                       "--lr", "1e-3", "--checkpoint-every", "2", "--out", str(tmp_path / out))

    first = cli("a")
    assert first.returncode == 0, first.stderr[-4000:]
    assert sorted(p.name for p in (tmp_path / "a.ckpt").iterdir()) == ["step-00000002", "step-00000004"]
    shutil.copytree(tmp_path / "a.ckpt" / "step-00000002", tmp_path / "b.ckpt" / "step-00000002")
    shutil.copytree(tmp_path / "a.ckpt" / "step-00000004", tmp_path / "b.ckpt" / "step-00000004",
                    ignore=shutil.ignore_patterns("manifest.json"))
    resumed = cli("b")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resumed from" in resumed.stderr and "step-00000002" in resumed.stderr
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    healed = load_model(tmp_path / "b")[0]
    assert all(torch.equal(MaskSet.from_model(healed).masks[n], m) for n, m in masks.masks.items())
