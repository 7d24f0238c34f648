"""Every shipped accelerate config launched exactly as its header's CPU form says (the command is read from the
header, so header and test cannot drift), and `checkpoint.resume` under 2 processes whose disks disagree.

Each header holds a `# GPU:` and a `# CPU:` command. The tests run the CPU form with `accelerate`/`torchrun`
replaced by this interpreter's module of the same program, a free port added, and the fine-tune arguments after
`finetune` replaced by a tiny pruned model's; everything else (environment prefix, launcher flags) is verbatim.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from pydoc_data.topics import topics

import pytest
import torch
from launching import free_port
from safetensors.torch import load_file
from zero_worker import magnitude_prune

from sparsegpt.core.masks import MaskSet
from sparsegpt.storage.models import load_model, save_model

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.stem for p in (REPO / "recipes" / "accelerate").glob("*.yaml"))
PROGRAMS = {"accelerate": ["-m", "accelerate.commands.accelerate_cli"], "torchrun": ["-m", "torch.distributed.run"]}
PORT_FLAG = {"accelerate": "--main_process_port", "torchrun": "--master_port"}

# Runs the CLI in one launched process; on rank 1 it first hides part of the (shared) disk, as a node without
# the shared filesystem would see it: "manifests" hides every checkpoint manifest, "folders" every step folder.
WORKER = """\
import os, pathlib, sys
hide = sys.argv.pop(1)
if os.environ.get("RANK") == "1":
    is_file, is_dir = pathlib.Path.is_file, pathlib.Path.is_dir
    if hide == "manifests":
        pathlib.Path.is_file = lambda self: self.name != "manifest.json" and is_file(self)
    elif hide == "folders":
        pathlib.Path.is_dir = lambda self: not self.name.startswith("step-") and is_dir(self)
from sparsegpt.cli import main
sys.exit(main())
"""


def header_form(config: str, form: str) -> str:
    """The `# FORM:` command of recipes/accelerate/CONFIG.yaml's header, continuation lines joined."""
    lines = (REPO / "recipes" / "accelerate" / f"{config}.yaml").read_text().splitlines()
    prefix = f"# {form}:"
    starts = [i for i, line in enumerate(lines) if line.startswith(prefix)]
    assert len(starts) == 1, f"{config}.yaml: expected one {prefix!r} line in the header"
    i, parts = starts[0], [lines[starts[0]][len(prefix):]]
    while parts[-1].rstrip().endswith("\\"):
        parts[-1] = parts[-1].rstrip()[:-1]
        i += 1
        assert lines[i].startswith("#"), f"{config}.yaml: the {form} command continues past the header"
        parts.append(lines[i][1:])
    return " ".join(p.strip() for p in parts)


def cpu_launch(config: str, script: list[str], finetune_args: list[str],
               timeout: int = 300) -> subprocess.CompletedProcess:
    """Run the CONFIG header's CPU form, with `script` (e.g. ["-m", "sparsegpt.cli"]) and the arguments after
    `finetune` replaced; a free port added after the launcher."""
    words = shlex.split(header_form(config, "CPU"))
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "SPARSEGPT_NO_PROGRESS": "1",
           "PYTHONWARNINGS": "ignore"}
    while "=" in words[0]:
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    program = words.pop(0)
    assert program in PROGRAMS, f"{config}.yaml: CPU form starts with {program!r}, not accelerate/torchrun"
    at = words.index("-m")
    assert words[at:at + 3] == ["-m", "sparsegpt.cli", "finetune"], words
    launcher = words[:at]
    if program == "accelerate":
        assert launcher[0] == "launch", launcher
        launcher = launcher[:1] + [PORT_FLAG[program], str(free_port())] + launcher[1:]
    else:
        launcher = [PORT_FLAG[program], str(free_port()), *launcher]
    cmd = [sys.executable, *PROGRAMS[program], *launcher, *script, "finetune", *finetune_args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def finetune_args(model: Path, out: Path) -> list[str]:
    """4 steps with checkpoints at 2 and 4 on a few kB of stdlib-docs text (tokenizing all of it costs ~10 s)."""
    return ["--model", str(model), "--data", str(model.with_name("train.txt")), "--steps", "4", "--seqlen", "32",
            "--lr", "1e-3", "--checkpoint-every", "2", "--out", str(out)]


@pytest.fixture(scope="module")
def pruned(tiny_llama_dir, tmp_path_factory):
    """The tiny Llama 70 % magnitude-pruned, saved with its mask.safetensors, and train.txt next to it:
    (folder, masks)."""
    model, tokenizer = load_model(tiny_llama_dir)
    masks = magnitude_prune(model)
    folder = tmp_path_factory.mktemp("launch") / "pruned"
    save_model(model, tokenizer, folder)
    masks.save(folder / "mask.safetensors")
    folder.with_name("train.txt").write_text("\n\n".join(list(topics.values())[:12]))
    return folder, masks


@pytest.fixture(scope="module")
def launched(pruned, tmp_path_factory):
    """launched(config) -> (out folder, process) of the config's CPU form; each config is launched once."""
    done: dict[str, tuple[Path, subprocess.CompletedProcess]] = {}

    def get(config: str) -> tuple[Path, subprocess.CompletedProcess]:
        if config not in done:
            out = tmp_path_factory.mktemp(config) / "out"
            done[config] = out, cpu_launch(config, ["-m", "sparsegpt.cli"], finetune_args(pruned[0], out))
        return done[config]

    return get


def test_every_header_documents_a_gpu_and_a_cpu_command():
    assert CONFIGS == ["ddp", "single", "zero2", "zero3", "zero3_offload"]
    for config in CONFIGS:
        gpu, cpu = header_form(config, "GPU"), header_form(config, "CPU")
        assert f"--config_file recipes/accelerate/{config}.yaml --mixed_precision bf16 -m sparsegpt.cli" in gpu
        assert "-m sparsegpt.cli finetune" in cpu
        text = (REPO / "recipes" / "accelerate" / f"{config}.yaml").read_text()
        # accelerate refuses mixed_precision next to a deepspeed_config_file; the launch flag chooses it for all
        assert "\nmixed_precision:" not in text, config


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS)
def test_config_launches_on_cpu_as_its_header_documents(config, launched, pruned):
    out, proc = launched(config)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # ZeRO-3 configs build the model straight into each rank's partition (zero3_init_flag), never whole
    sharded = proc.stderr.count(" into ZeRO-3 partitions")
    assert sharded == (2 if config.startswith("zero3") else 0), proc.stderr[-4000:]
    manifest = json.loads((out.with_name("out.ckpt") / "step-00000004" / "manifest.json").read_text())
    assert manifest["num_processes"] == (1 if config == "single" else 2)
    deepspeed_files = list((out.with_name("out.ckpt") / "step-00000004").rglob("*optim_states.pt"))
    assert len(deepspeed_files) == (2 if config.startswith("zero") else 0), deepspeed_files
    model, _ = load_model(out)
    saved = MaskSet.load(out / "mask.safetensors")
    for name, mask in pruned[1].masks.items():
        assert torch.equal(saved.masks[name], mask), name
    saved.verify(model)  # every pruned weight exactly 0 in the trained model


@pytest.mark.slow
def test_zero3_resume_uses_the_main_process_choice_when_a_rank_sees_no_manifest(launched, pruned, tmp_path):
    """Rank 1 sees no manifest (as a stale or local disk would); it still loads the step-2 checkpoint rank 0
    chose, and the resumed run ends bit for bit where the uninterrupted one did."""
    first, proc = launched("zero3")
    assert proc.returncode == 0, proc.stderr[-4000:]
    shutil.copytree(first.with_name("out.ckpt") / "step-00000002", tmp_path / "b.ckpt" / "step-00000002")
    (tmp_path / "worker.py").write_text(WORKER)
    resumed = cpu_launch("zero3", [str(tmp_path / "worker.py"), "manifests"], finetune_args(pruned[0], tmp_path / "b"))
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert resumed.stderr.count("resumed from") == 2 and "step-00000002" in resumed.stderr
    a, b = load_file(str(first / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_resume_fails_on_every_rank_when_one_cannot_see_the_checkpoint(pruned, tmp_path):
    """Rank 1 cannot see the folder rank 0 chose: every rank stops with the same one-line error, no hang (ZeRO-2:
    the check comes before load_state, so the stage does not matter, and ZeRO-2 starts faster)."""
    step = tmp_path / "b.ckpt" / "step-00000002"
    step.mkdir(parents=True)
    (step / "manifest.json").write_text(json.dumps({"step": 2, "micro_batches": 2, "losses": [1.0, 1.0], "seed": 0,
                                                    "num_processes": 2, "micro_batch_size": 1, "grad_accum": 1}))
    (tmp_path / "worker.py").write_text(WORKER)
    proc = cpu_launch("zero2", [str(tmp_path / "worker.py"), "folders"], finetune_args(pruned[0], tmp_path / "b"),
                      timeout=240)
    assert proc.returncode != 0
    message = (f"error: checkpoint {step} (chosen by the main process) is not visible to process(es) 1; "
               "put the checkpoint dir on a filesystem every process shares")
    assert proc.stderr.count(message) == 2, proc.stderr[-4000:]
    assert not (tmp_path / "b").exists()
