"""`lr: auto` (sparsegpt/run/lr_search.py): the healing lr chosen on the tune split by short probes, recorded,
resumable, the same on every rank; its settings and pre-flight checks. Runs are real subprocesses of
train/progressive.py on the tiny Llama (CPU, float32, fixed seeds), as in tests/test_progressive.py."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from launching import free_port

from sparsegpt.config.recipe import load_recipe
from sparsegpt.config.settings import FinetuneSettings, LrSearchSettings
from sparsegpt.core import data
from sparsegpt.core.data import eval_ids, load_text
from sparsegpt.core.errors import UserError
from sparsegpt.run.lr_search import LR_SEARCH_FILE, check_search, choose, probe_plan, tune_windows
from sparsegpt.run.memory import plan_for

ROOT = Path(__file__).resolve().parents[1]
CANDIDATES = [1.0e-4, 1.0e-3, 1.0e-2]

RECIPE = """\
name: tune1
model: {model}
dtype: float32
seed: 0
data: {{calibration: stdlib-docs}}
defaults:
  prune: {{nsamples: 8, seqlen: 32, batch_size: 4, blocksize: 16}}
  finetune: {{steps: 8, seqlen: 32, lr: {lr}, warmup_steps: 2, checkpoint_every: 4{search}}}
  eval:
    hooks:
      - {{type: perplexity, source: stdlib-docs, seqlen: 32, max_windows: 4}}
stages:
  - {{name: s50, target: 0.5}}
"""
SEARCH = ", lr_search: {candidates: [1.0e-4, 1.0e-3, 1.0e-2], tokens: 64, windows: 4}"


def write(path: Path, model: Path, lr: str = "auto", search: str = SEARCH, distributed: str = "") -> Path:
    path.write_text(RECIPE.format(model=model, lr=lr, search=search if lr == "auto" else "") + distributed)
    return path


def progressive(recipe: Path, run_dir: Path, failpoint: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SPARSEGPT_NO_PROGRESS": "1", "PYTHONHASHSEED": "0"}
    env.pop("SPARSEGPT_FAILPOINT", None)
    if failpoint:
        env["SPARSEGPT_FAILPOINT"] = failpoint
    return subprocess.run([sys.executable, str(ROOT / "train" / "progressive.py"), "--recipe", str(recipe),
                           "--run-dir", str(run_dir)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def search_record(run_dir: Path) -> dict:
    return json.loads((run_dir / "stages" / "00-s50" / LR_SEARCH_FILE).read_text())


def scores(record: dict) -> list[tuple[float, float | None, float | None]]:
    """What must match between searches: each candidate's lr, tune perplexity and probe loss (not wall times)."""
    return [(r["lr"], r["ppl"], r.get("final_loss")) for r in record["results"]]


@pytest.fixture(scope="module")
def auto_run(tiny_llama_dir, tmp_path_factory):
    """The uninterrupted one-stage run with `lr: auto`: (recipe, run dir, process)."""
    tmp = tmp_path_factory.mktemp("lr-auto")
    recipe = write(tmp / "tune1.yaml", tiny_llama_dir)
    proc = progressive(recipe, tmp / "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return recipe, tmp / "run", proc


@pytest.mark.slow
def test_lr_auto_resolves_records_and_fine_tunes_at_the_choice(auto_run, tiny_llama_dir, tmp_path):
    _, run_dir, proc = auto_run
    record = search_record(run_dir)  # kept when the stage completes
    assert [r["lr"] for r in record["results"]] == CANDIDATES
    assert (record["steps"], record["stage_steps"], record["warmup_steps"], record["windows"]) == (2, 8, 1, 4)
    assert record["cost"] == pytest.approx(3 * 2 / 8) and record["split"] == "tune"
    ppls = [r["ppl"] for r in record["results"]]
    assert all(math.isfinite(p) for p in ppls) and len(set(ppls)) == 3  # the probes differ
    chosen = CANDIDATES[ppls.index(min(ppls))]
    assert record["chosen"] == chosen
    finetuned = [r for r in records(run_dir) if r["phase"] == "finetuned"][0]
    assert finetuned["lr_search"] == {"chosen": chosen, "cost": record["cost"], "probe_steps": 2,
                                      "tune_ppl": {f"{c:g}": p for c, p in zip(CANDIDATES, ppls)}}
    assert f"lr auto -> {chosen:g}" in proc.stderr and "= 75% of the stage's 8 steps" in proc.stderr
    assert sorted(p.name for p in (run_dir / "stages" / "00-s50").iterdir()) == ["lr_search.json", "model"]
    # the same recipe with the chosen lr written out fine-tunes to the same model, bit for bit: the stage used the
    # chosen lr, and the probes left nothing behind (RNG state, data order, memory) that changed its fine-tuning
    fixed = write(tmp_path / "fixed.yaml", tiny_llama_dir, lr=repr(chosen))
    proc_fixed = progressive(fixed, tmp_path / "run")
    assert proc_fixed.returncode == 0, proc_fixed.stderr[-3000:]
    assert [r["metrics"] for r in records(tmp_path / "run")] == [r["metrics"] for r in records(run_dir)]
    assert "lr_search" not in records(tmp_path / "run")[1] and "lr auto" not in proc_fixed.stderr


def test_tune_windows_are_not_evaluation_windows(tiny_tokenizer):
    """The probes' windows are the tune split's, whose documents the evaluation split never holds; no 128-token
    window recurs in the evaluation text (at 32 tokens one does: a doctest line repeated across stdlib docstrings)."""
    tune = tune_windows("stdlib-docs", tiny_tokenizer, seqlen=128, windows=32)
    stream = torch.tensor(tiny_tokenizer(load_text("stdlib-docs", "tune"), add_special_tokens=False)["input_ids"])
    assert torch.equal(tune.flatten(), stream[: tune.numel()])
    docs = data._stdlib_docs()
    assert not set(data._split_docs(docs, "tune")) & set(data._split_docs(docs, "test"))
    rows = eval_ids("stdlib-docs", tiny_tokenizer, seqlen=128).flatten().unfold(0, 128, 1)
    assert not any(bool((rows == row).all(dim=1).any()) for row in tune)


@pytest.mark.slow
def test_kill_during_the_search_resumes_to_the_same_choice_and_metrics(auto_run, tmp_path):
    recipe, ref_dir, _ = auto_run
    run_dir = tmp_path / "run"
    killed = progressive(recipe, run_dir, failpoint="finetune/lr-search:2")  # after the second candidate
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    partial = search_record(run_dir)
    assert "chosen" not in partial and scores(partial) == scores(search_record(ref_dir))[:2]
    resumed = progressive(recipe, run_dir, failpoint="finetune/step:3")  # probes 1 and 2 not rerun: 3rd probe's
    assert resumed.returncode == -signal.SIGKILL  # 2 steps pass, then the stage's own step 1 of 8 is the 3rd
    assert search_record(run_dir)["chosen"] == search_record(ref_dir)["chosen"]
    again = progressive(recipe, run_dir)  # a finished search is read back, never redone
    assert again.returncode == 0, again.stderr[-3000:]
    assert "recorded in" in again.stderr and "tune ppl" not in again.stderr
    assert scores(search_record(run_dir)) == scores(search_record(ref_dir))
    strip = ("seconds", "time", "world")
    assert [{k: v for k, v in r.items() if k not in strip} for r in records(run_dir)] == \
        [{k: v for k, v in r.items() if k not in strip} for r in records(ref_dir)]


@pytest.mark.slow
def test_two_processes_choose_the_same_lr_on_every_rank(tiny_llama_dir, tmp_path):
    """2 CPU processes under ZeRO-3 (each rank runs every probe and scores all windows): one choice, every rank."""
    recipe = write(tmp_path / "z3.yaml", tiny_llama_dir,
                   distributed="distributed: {zero_stage: 3, micro_batch_size: 1, grad_accum: 1}\n")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
           "SPARSEGPT_NO_PROGRESS": "1", "PYTHONHASHSEED": "0"}
    env.pop("SPARSEGPT_FAILPOINT", None)
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                           "recipes/accelerate/zero3.yaml", "--num_processes", "2", "--mixed_precision", "no",
                           "--main_process_port", str(free_port()), str(ROOT / "train" / "progressive.py"),
                           "--recipe", str(recipe), "--run-dir", str(tmp_path / "run")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    record = search_record(tmp_path / "run")
    assert record["world_size"] == 2 and record["tokens_per_step"] == 2 * 32
    lines = [line for line in proc.stderr.splitlines() if "fine-tuning at lr" in line]
    assert sorted(line.split("(rank ")[1] for line in lines) == ["0)", "1)"]
    assert {line.split("fine-tuning at lr ")[1].split()[0] for line in lines} == {f"{record['chosen']:g}"}


def test_probe_plan_scales_the_stage():
    plan = probe_plan(LrSearchSettings(), stage_steps=32, warmup_steps=3, tokens_per_step=512)
    assert (plan.steps, plan.warmup_steps, plan.cost) == (4, 1, 0.5)  # an eighth; 3 x 4/32 rounds to 0, kept >= 1
    plan = probe_plan(LrSearchSettings(tokens=5000), stage_steps=100, warmup_steps=10, tokens_per_step=512)
    assert (plan.steps, plan.warmup_steps) == (10, 1)  # 5000 tokens = 9.8 steps, rounded up
    assert probe_plan(LrSearchSettings(), stage_steps=3, warmup_steps=0, tokens_per_step=1).steps == 1
    assert LrSearchSettings(candidates=[1e-3, 1e-4]).candidates == [1e-4, 1e-3]
    assert LrSearchSettings().cost(32, 512) == "4 x 4 steps (2048 tokens) = 50% of the stage's 32 steps"
    with pytest.raises(UserError, match="lr_search.tokens 9000 is more than the stage's 16 steps x 512 tokens"):
        LrSearchSettings(tokens=9000).probe_steps(16, 512)


def test_choice_is_the_lowest_tune_perplexity_ties_to_the_smaller_lr():
    results = [{"lr": 1e-4, "ppl": 30.0}, {"lr": 1e-3, "ppl": 20.0}, {"lr": 3e-3, "ppl": 20.0},
               {"lr": 1e-2, "ppl": None, "diverged_at": 2}]
    assert choose(results)["lr"] == 1e-3
    assert choose(list(reversed(results)))["lr"] == 1e-3
    assert choose([{"lr": 1e-2, "ppl": None}, {"lr": 1e-4, "ppl": 1e9}])["lr"] == 1e-4  # diverged never wins
    with pytest.raises(UserError, match="stage s1: every lr candidate diverged in its probe \\(0.01, 0.1\\)"):
        choose([{"lr": 1e-2, "ppl": None}, {"lr": 1e-1, "ppl": None}], "s1")


@pytest.mark.parametrize("finetune, message", [
    ("{steps: 2, lr: 0}", "defaults.finetune.lr: Input should be greater than 0 (got 0)"),
    ("{steps: 2, lr: fast}", "defaults.finetune.lr: 'fast' is neither a learning rate (e.g. 1e-4) nor 'auto'"),
    ("{steps: 2, lr: true}", "True is neither a learning rate"),
    ("{steps: 2, lr: 1.0e-3, lr_search: {windows: 2}}", "lr_search is set but lr is 0.001; use lr: auto"),
    ("{steps: 2, lr: auto, lr_search: {candidates: []}}", "lr_search.candidates: List should have at least 1 item"),
    ("{steps: 2, lr: auto, lr_search: {candidates: [0.1, 0.1]}}", "repeat a value"),
    ("{steps: 2, lr: auto, lr_search: {candidates: [-1]}}",
     "lr_search.candidates[0]: Input should be greater than 0 (got -1)"),
    ("{steps: 2, lr: auto, lr_search: {windows: 0}}", "lr_search.windows: Input should be greater than or equal"),
    ("{steps: 2, lr: auto, lr_search: {rate: 1}}", "unknown key 'rate'"),
])
def test_bad_lr_settings_are_one_line_errors(tmp_path, finetune, message):
    path = tmp_path / "r.yaml"
    path.write_text(f"name: r\nmodel: m\ndata: {{calibration: stdlib-docs}}\ndefaults:\n  finetune: {finetune}\n"
                    "stages:\n  - {name: a, target: 0.5}\n")
    with pytest.raises(UserError) as info:
        load_recipe(path)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_stage_may_fix_its_lr_under_searching_defaults():
    assert FinetuneSettings(steps=2, lr=1e-3, lr_search=None).search is None
    assert FinetuneSettings(steps=2, lr="auto").search == LrSearchSettings()


@pytest.mark.parametrize("change, message", [
    (("windows: 4}", "windows: 100000}"), "lr_search.windows is 100000 but the tune split of stdlib-docs holds"),
    (("tokens: 64,", "tokens: 100000,"), "lr_search.tokens 100000 is more than the stage's 8 steps x 32 tokens"),
    (("max_windows: 4}", "max_windows: 4, split: tune}"), "a perplexity hook reads the tune split of stdlib-docs"),
], ids=["windows", "tokens", "eval-on-tune"])
def test_preflight_refuses_before_the_run_dir_exists(tiny_llama_dir, tiny_tokenizer, tmp_path, change, message):
    recipe = write(tmp_path / "r.yaml", tiny_llama_dir)
    recipe.write_text(recipe.read_text().replace(*change))
    with pytest.raises(UserError, match=message):
        check_search(load_recipe(recipe), tiny_tokenizer, world_size=1, seqlen_of=lambda s: 32)
    if change[0] == "windows: 4}":  # the real entry: `error: ...` on one line, exit 2, no run dir
        proc = progressive(recipe, tmp_path / "run")
        assert proc.returncode == 2 and proc.stderr.startswith("error: stages[0].finetune: lr_search.windows")
        assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


def test_dry_run_states_the_probe_cost(tiny_llama_dir, tmp_path):
    plan = plan_for(load_recipe(write(tmp_path / "r.yaml", tiny_llama_dir)))
    assert "8 steps lr auto (probes 3 x 2 steps (64 tokens) = 75% of the stage's 8 steps) cosine" in plan


def test_finetune_config_needs_the_resolved_lr(tiny_llama_dir, tmp_path):
    from sparsegpt.run.configs import finetune_config

    recipe = load_recipe(write(tmp_path / "r.yaml", tiny_llama_dir))
    stage = recipe.resolved_stages()[0]
    with pytest.raises(ValueError, match="has lr: auto; resolve it"):
        finetune_config(stage, recipe, world_size=1, seqlen=32)
    assert finetune_config(stage, recipe, world_size=1, seqlen=32, lr=3e-4).lr == 3e-4
