"""End-to-end progressive runs of a tiny model through the real entry script, including SIGKILL and resume.

Each run is a real subprocess (`python train/progressive.py ...`, single process, CPU). A kill is a real SIGKILL
delivered at a named point (sparsegpt.core.failpoints); re-running the same command must reach exactly the metrics of
the uninterrupted run (CPU, float32, fixed seeds: bitwise equal).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from launching import free_port

from sparsegpt.storage.compact import is_compact, load_masks
from sparsegpt.storage.models import load_model

ROOT = Path(__file__).resolve().parents[1]

RECIPE = """\
name: tiny3
model: {model}
dtype: float32
seed: 0
trackers: [tensorboard]
data: {{calibration: stdlib-docs}}
defaults:
  prune: {{nsamples: 8, seqlen: 32, batch_size: 4, blocksize: 16}}
  finetune: {{steps: 6, seqlen: 32, lr: 1.0e-3, warmup_steps: 1, checkpoint_every: 2}}
  eval:
    hooks:
      - {{type: perplexity, source: stdlib-docs, seqlen: 32, max_windows: 4}}
      - {{type: sparsity}}
stages:
  - {{name: s50, target: 0.5}}
  - {{name: s70, target: 0.7}}
  - {{name: s90, target: 0.9{last}}}
"""


def write_recipe(path: Path, model_dir: Path, last: str = "") -> Path:
    path.write_text(RECIPE.format(model=model_dir, last=last))
    return path


def progressive(recipe: Path, run_dir: Path, *extra: str, failpoint: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SPARSEGPT_NO_PROGRESS": "1", "PYTHONHASHSEED": "0"}
    env.pop("SPARSEGPT_FAILPOINT", None)
    if failpoint:
        env["SPARSEGPT_FAILPOINT"] = failpoint
    return subprocess.run([sys.executable, str(ROOT / "train" / "progressive.py"), "--recipe", str(recipe),
                           "--run-dir", str(run_dir), *extra], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def comparable(recs: list[dict]) -> list[tuple]:
    """What must match between an interrupted-and-resumed run and an uninterrupted one (not wall times)."""
    return [(r["stage"], r["name"], r["phase"], r["target"], r["sparsity"], json.dumps(r["metrics"], sort_keys=True))
            for r in recs]


@pytest.fixture(scope="module")
def reference(tiny_llama_dir, tmp_path_factory):
    """The uninterrupted 3-stage run every kill test is compared with."""
    tmp = tmp_path_factory.mktemp("progressive-ref")
    recipe = write_recipe(tmp / "tiny3.yaml", tiny_llama_dir)
    run_dir = tmp / "run"
    proc = progressive(recipe, run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return recipe, run_dir, proc


@pytest.mark.slow
def test_three_stage_run_writes_the_contract(reference):
    recipe, run_dir, proc = reference
    recs = records(run_dir)
    assert [(r["stage"], r["phase"]) for r in recs] == [
        (0, "pruned"), (0, "finetuned"), (1, "pruned"), (1, "finetuned"), (2, "pruned"), (2, "finetuned")]
    for r in recs:
        assert r["name"] == ["s50", "s70", "s90"][r["stage"]]
        assert r["target"] == [0.5, 0.7, 0.9][r["stage"]]
        assert abs(r["sparsity"] - r["target"]) < 0.01, r
        ppl = r["metrics"]["ppl/stdlib-docs"]
        assert ppl == ppl and 1 < ppl < 1e6
    sparsities = [r["sparsity"] for r in recs]
    assert sparsities == sorted(sparsities), "sparsity must never decrease across stages"
    assert (run_dir / "recipe.yaml").exists() and (run_dir / "state.json").exists()
    stages = sorted((run_dir / "stages").iterdir())
    assert [p.name for p in stages] == ["00-s50", "01-s70", "02-s90"]
    for p in stages:  # only the finished model stays; mid-stage checkpoints and the pruned copy are gone
        assert sorted(q.name for q in p.iterdir()) == ["model"]
    # the final model reloads with plain transformers at the reported sparsity
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(stages[-1] / "model")
    weights = [m.weight for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and ".layers." in name]
    measured = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert measured == pytest.approx(recs[-1]["sparsity"], abs=1e-9)
    # the stage table is printed after each stage
    assert "s90" in proc.stdout
    # every evaluation also went to the recipe's tracker (tensorboard event files under RUN_DIR/trackers)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((run_dir / "trackers").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    logged = events.Scalars("finetuned/ppl/stdlib-docs")
    assert [e.step for e in logged] == [1, 3, 5]
    assert [e.value for e in logged] == pytest.approx(
        [r["metrics"]["ppl/stdlib-docs"] for r in recs if r["phase"] == "finetuned"], rel=1e-6)


# One run killed four times in a row, each time at another kind of point, then resumed to the end. Failpoint
# counts restart with every process; the tiny recipe has 2 decoder layers and 6 fine-tuning steps per stage
# with a checkpoint every 2 steps.
KILLS = [
    "prune/layer:3",                 # stage 1 (s70) pruning, after its first decoder layer (stage 0 is done)
    "finetune/step:3",               # stage 1 pruned again, fine-tuning step 3 of 6: the step-2 checkpoint stays
    "checkpoint/before-manifest:1",  # resumed at step 2; the step-4 checkpoint is written but has no manifest
    "save/before-rename:1",          # resumed at step 2 again; the stage model is complete but not renamed in
]


@pytest.mark.slow
def test_kill_and_resume_reaches_the_same_metrics(reference, tmp_path):
    recipe, ref_dir, _ = reference
    run_dir = tmp_path / "run"
    for point in KILLS:
        killed = progressive(recipe, run_dir, failpoint=point)
        assert killed.returncode == -signal.SIGKILL, (point, killed.returncode, killed.stderr[-3000:])
    state = json.loads((run_dir / "state.json").read_text())
    assert "complete" in state["stages"]["0"]["done"] and "complete" not in state["stages"]["1"]["done"]
    resumed = progressive(recipe, run_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert comparable(records(run_dir)) == comparable(records(ref_dir))
    assert sorted(p.name for p in (run_dir / "stages" / "01-s70").iterdir()) == ["model"]


@pytest.mark.slow
@pytest.mark.slow
def test_streamed_pruning_gives_the_same_run(reference, tmp_path, tiny_llama_dir):
    """`prune.stream: true` (one decoder layer in memory, read from and written to safetensors) reaches exactly the
    in-memory run's records."""
    _, ref_dir, _ = reference
    recipe = tmp_path / "tiny3.yaml"
    text = RECIPE.format(model=tiny_llama_dir, last="")
    recipe.write_text(text.replace("blocksize: 16}", "blocksize: 16, stream: true}"))
    proc = progressive(recipe, tmp_path / "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = records(tmp_path / "run")
    assert comparable(recs) == comparable(records(ref_dir))
    pruned = [r for r in recs if r["phase"] == "pruned"]
    assert all(r["world"]["streamed"] and r["world"]["size"] == 1 for r in pruned), pruned


def test_finished_run_rerun_is_a_no_op(reference):
    recipe, run_dir, _ = reference
    before = (run_dir / "metrics.jsonl").read_text()
    again = progressive(recipe, run_dir)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (run_dir / "metrics.jsonl").read_text() == before


def test_other_recipe_in_run_dir_is_refused(reference, tmp_path, tiny_llama_dir):
    _, run_dir, _ = reference
    other = write_recipe(tmp_path / "other.yaml", tiny_llama_dir, last=", finetune: {steps: 2}")
    listing = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
    proc = progressive(other, run_dir)
    assert proc.returncode == 2
    assert "holds another recipe" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) == listing


def test_missing_model_fails_before_writing(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "no-such-model")
    proc = progressive(recipe, tmp_path / "run")
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "no-such-model" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_dry_run_prints_plan_and_writes_nothing(tiny_llama_dir, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_llama_dir)
    proc = progressive(recipe, tmp_path / "run", "--dry-run")
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ("s50", "s70", "s90"):
        assert name in proc.stdout
    assert "GiB" in proc.stdout
    assert not (tmp_path / "run").exists()


def zero3_recipe(path: Path, model_dir: Path) -> Path:
    """Two stages of the tiny recipe under ZeRO-3 from the recipe's `distributed` section, streamed pruning (every
    rank streams the layers, calibrates its share; rank 0 writes), 4 fine-tuning steps with a checkpoint every 2,
    and the greedy-samples hook (it hung a multi-rank ZeRO-3 run once)."""
    text = RECIPE.format(model=model_dir, last="").replace(
        "seed: 0\n", "seed: 0\ndistributed: {zero_stage: 3, micro_batch_size: 2, grad_accum: 1}\n")
    text = text.replace("steps: 6", "steps: 4").replace("blocksize: 16}", "blocksize: 16, stream: true}")
    text = text.replace("      - {type: sparsity}\n", "      - {type: sparsity}\n"
                        "      - {type: samples, prompts: [\"def f\"], max_new_tokens: 4}\n")
    assert "type: samples" in text and "checkpoint_every: 2" in text and "stream: true" in text
    path.write_text(text[:text.index("  - {name: s90")])  # two stages are enough here
    return path


def launch2(recipe: Path, run_dir: Path, failpoint: str | None = None) -> subprocess.CompletedProcess:
    """train/progressive.py on 2 CPU processes (accelerate launch, DeepSpeed over gloo; the recipe's plugin
    replaces the config file's). On a CPU-only machine only a DeepSpeed launch starts 2 processes."""
    port = free_port()
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
           "SPARSEGPT_NO_PROGRESS": "1", "PYTHONHASHSEED": "0"}
    env.pop("SPARSEGPT_FAILPOINT", None)
    if failpoint:
        env["SPARSEGPT_FAILPOINT"] = failpoint
    return subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                           "recipes/accelerate/zero3.yaml", "--num_processes", "2", "--mixed_precision", "no",
                           "--main_process_port", str(port), str(ROOT / "train" / "progressive.py"),
                           "--recipe", str(recipe), "--run-dir", str(run_dir)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def zero3_reference(tiny_llama_dir, tmp_path_factory):
    """The uninterrupted 2-process ZeRO-3 run: (recipe, run dir, process)."""
    tmp = tmp_path_factory.mktemp("zero3-ref")
    recipe = zero3_recipe(tmp / "z3.yaml", tiny_llama_dir)
    proc = launch2(recipe, tmp / "run")
    return recipe, tmp / "run", proc


@pytest.mark.slow
def test_two_process_zero3_progressive_run_keeps_masks(zero3_reference):
    """2 CPU processes, ZeRO-3: both fine-tune (the model built straight into each rank's partition), evaluation
    (greedy samples included) completes on the main process."""
    _, run_dir, proc = zero3_reference
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "accelerator: DEEPSPEED, 2 process(es), zero stage 3" in proc.stderr
    assert proc.stderr.count("into ZeRO-3 partitions") == 2 * 2  # student + (no KD) per rank, two stages
    recs = records(run_dir)
    assert [(r["stage"], r["phase"]) for r in recs] == [(0, "pruned"), (0, "finetuned"), (1, "pruned"),
                                                         (1, "finetuned")]
    assert all(len(r["metrics"]["samples"]) == 1 and "errors" not in r for r in recs), recs
    for r in recs:  # both ranks worked: perplexity windows split 2 + 2, the calibration set 4 + 4 rows
        assert r["world"]["size"] == 2 and r["world"]["eval_shares"]["ppl/stdlib-docs"] == [2, 2], r["world"]
        if r["phase"] == "pruned":
            ranks = r["world"]["prune_ranks"]
            assert r["world"]["streamed"] and [q["calibration_rows"] for q in ranks] == [4, 4], ranks
            assert all(q["linears"] > 0 for q in ranks), ranks
    from sparsegpt.core.masks import MaskSet

    for i, name in enumerate(["00-s50", "01-s70"]):
        folder = run_dir / "stages" / name / "model"
        model, _ = load_model(folder)
        masks = MaskSet.load(folder / "mask.safetensors")
        masks.verify(model)  # every masked weight exactly 0 after ZeRO-3 training
        assert masks.sparsity() == pytest.approx([0.5, 0.7][i], abs=0.01)
    assert recs[1]["sparsity"] == recs[0]["sparsity"] and recs[3]["sparsity"] == recs[2]["sparsity"]


# The 2-process run killed twice (every rank passes the failpoint its SPARSEGPT_FAILPOINT names; the launcher then
# stops the other), then resumed: 2 decoder layers, 4 fine-tuning steps per stage, checkpoint every 2. (The other
# kill points are the 1-process test's; these two are where several ranks must agree: a resumed ZeRO-3 checkpoint
# and the distributed, streamed pass.)
KILLS_2 = [
    "finetune/step:3",               # stage 0 fine-tuning, step 3 of 4: the step-2 checkpoint stays
    "prune/layer:1",                 # resumed at step 2, stage 0 finished; stage 1 pruning, after its first layer
]


@pytest.mark.slow
def test_two_process_kill_and_resume_reaches_the_same_metrics(zero3_reference, tmp_path):
    recipe, ref_dir, ref = zero3_reference
    assert ref.returncode == 0, ref.stderr[-4000:]
    run_dir = tmp_path / "run"
    killed = []
    for point in KILLS_2:
        killed.append(launch2(recipe, run_dir, failpoint=point))
        assert killed[-1].returncode != 0, (point, killed[-1].stderr[-3000:])
    assert killed[1].stderr.count("resumed from") == 2  # both ranks loaded the step-2 checkpoint of stage 0
    state = json.loads((run_dir / "state.json").read_text())
    assert "complete" in state["stages"]["0"]["done"] and not state["stages"].get("1", {}).get("done")
    resumed = launch2(recipe, run_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert comparable(records(run_dir)) == comparable(records(ref_dir))
    assert sorted(p.name for p in (run_dir / "stages" / "01-s70").iterdir()) == ["model"]


@pytest.mark.parametrize("old, new", [
    ("nsamples: 8,", "nsamples: 1000000000000,"),
    ("finetune: {{steps: 6, seqlen: 32,", "finetune: {{steps: 6, seqlen: 1000000,"),
], ids=["calibration", "finetune"])
def test_data_too_small_fails_before_writing(tiny_llama_dir, tmp_path, old, new):
    """What needs the tokenizer is checked before the run dir is touched (the phase table's rule)."""
    recipe = tmp_path / "big.yaml"
    assert old in RECIPE
    recipe.write_text(RECIPE.replace(old, new).format(model=tiny_llama_dir, last=""))
    proc = progressive(recipe, tmp_path / "run")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-2000:]
    assert "needed" in proc.stderr or "optimizer step needs" in proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_compact_stage_models_give_the_same_run(reference, tmp_path, tiny_llama_dir):
    """`save: compact`: each finished stage's model is a compact folder, read back bit-identically, so the next
    stage prunes the same weights and the metrics equal the dense run's."""
    _, ref_dir, _ = reference
    text = RECIPE.format(model=tiny_llama_dir, last="").replace("seed: 0\n", "seed: 0\nsave: compact\n")
    recipe = tmp_path / "compact.yaml"
    recipe.write_text(text[:text.index("  - {name: s90")])  # two stages: the second starts from a compact model
    proc = progressive(recipe, tmp_path / "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert comparable(records(tmp_path / "run")) == comparable(records(ref_dir))[:4]
    for name in ("00-s50", "01-s70"):
        folder = tmp_path / "run" / "stages" / name / "model"
        assert is_compact(folder) and sorted(p.name for p in folder.parent.iterdir()) == ["model"]
        model, _ = load_model(folder)
        load_masks(folder).verify(model)
