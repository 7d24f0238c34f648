"""The regime study (bench/regime/regime.py): every planned recipe is valid and spends exactly its budget; the report's
table, derived one-shot row, seed spreads and winner verdicts, from run dirs written the way the scheduler does."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from sparsegpt.config.recipe import Recipe, load_recipe
from sparsegpt.run.rundir import append_metrics

BENCH = Path(__file__).parents[1] / "bench" / "regime"


def _module(name: str):
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


regime = _module("regime")
report = _module("regime_report")


@pytest.mark.parametrize("recipe, budget, seed", regime.PLAN, ids=lambda v: str(v))
def test_every_planned_run_is_a_valid_recipe_that_spends_its_budget(recipe, budget, seed):
    r = Recipe.model_validate(regime.build_recipe(recipe, budget, seed))
    stages = r.resolved_stages()
    assert sum(s.finetune.tokens for s in stages if s.finetune) == budget
    assert stages[-1].target == 0.9 and r.seed == seed
    # the same evaluation windows, calibration and optimiser for every run: only what the recipe is about differs
    assert {h["source"]: h["max_windows"] for h in stages[-1].eval.hooks if h["type"] == "perplexity"} == {
        "stdlib-docs": 32, "debian-licenses": 32}
    assert all(s.prune.nsamples == 32 and s.finetune.lr == 1e-4 for s in stages if s.finetune)


def _run(out: Path, name: str, values: dict[tuple[float, str], tuple[float, float]]) -> None:
    folder = out / "runs" / name
    folder.mkdir(parents=True)
    for i, ((target, phase), (docs, licenses)) in enumerate(sorted(values.items())):
        append_metrics(folder, {"stage": i, "name": f"s{round(target * 100)}", "phase": phase, "target": target,
                                "sparsity": target, "metrics": {"ppl/stdlib-docs": docs,
                                                                "ppl/debian-licenses": licenses}})


def test_report_table_spread_and_verdicts(tmp_path):
    _run(tmp_path, "oneshot-heal-16k-s0", {(0.9, "pruned"): (900.0, 2000.0), (0.9, "finetuned"): (100.0, 300.0)})
    _run(tmp_path, "oneshot-heal-16k-s1", {(0.9, "pruned"): (1100.0, 2200.0), (0.9, "finetuned"): (110.0, 320.0)})
    _run(tmp_path, "prog4-16k-s0", {(0.8, "finetuned"): (40.0, 90.0), (0.9, "finetuned"): (60.0, 150.0)})
    _run(tmp_path, "prog4-64k-s0", {(0.8, "finetuned"): (30.0, 80.0), (0.9, "finetuned"): (45.0, 140.0)})
    _run(tmp_path, "gmp4-64k-s0", {(0.8, "finetuned"): (35.0, 85.0), (0.9, "finetuned"): (47.0, 130.0)})
    _run(tmp_path, "prog5-16k-s0", {(0.8, "finetuned"): (41.0, 91.0)})  # unfinished: no 90 % result yet
    names = ["oneshot-heal-16k-s0", "oneshot-heal-16k-s1", "prog4-16k-s0", "prog4-64k-s0", "gmp4-64k-s0",
             "prog5-16k-s0", "never-ran-16k-s0"]
    md = report.write_report(tmp_path, {"metrics": {"ppl/stdlib-docs": 15.0, "ppl/debian-licenses": 40.0}}, names)
    lines = md.splitlines()
    row = {line.split(" | ")[0].strip("| "): line for line in lines if line.startswith("| ")}
    assert "| oneshot | 0 | 0,1 | - | 1000.0 ±100.0 |" in row["oneshot"]  # (a) = the heal runs before healing
    assert "| oneshot-heal | 16,384 | 0,1 | - | 105.0 ±5.0 | 7.0 |" in md
    assert "prog5" not in row
    verdict_16k = next(line for line in lines if line.startswith("- 16k"))
    assert "**prog4** (60.0), 45.0 ahead of oneshot-heal" in verdict_16k and "the winner" in verdict_16k
    verdict_64k = next(line for line in lines if line.startswith("- 64k"))
    assert "**prog4** (45.0)" in verdict_64k and "no second seed" in verdict_64k
    assert "it is not the best" in verdict_64k  # gmp4 is better held out: the verdict says so
    assert (tmp_path / "regime_sparsity.png").stat().st_size > 0 and (tmp_path / "regime_tokens.png").is_file()


def test_a_lead_inside_the_seed_spread_calls_no_winner(tmp_path):
    _run(tmp_path, "prog4-16k-s0", {(0.9, "finetuned"): (60.0, 150.0)})
    _run(tmp_path, "prog4-16k-s1", {(0.9, "finetuned"): (70.0, 150.0)})
    _run(tmp_path, "prog4-kd-16k-s0", {(0.9, "finetuned"): (63.0, 140.0)})
    md = report.write_report(tmp_path, {"metrics": {"ppl/stdlib-docs": 15.0, "ppl/debian-licenses": 40.0}},
                             ["prog4-16k-s0", "prog4-16k-s1", "prog4-kd-16k-s0"])
    assert "**prog4-kd** (63.0), 2.0 ahead of prog4 — within the largest seed spread here (10.0)" in md


def test_shipped_smollm2_recipes_are_the_study_runs_their_headers_quote():
    """smollm2_90 is the tuned study's recon-heal-64k-s0 and smollm2_80 its recon-heal80-64k-s0, setting for setting
    (only `mixed_precision: auto`, which is float32 where the study ran, differs), at the lr the study chose."""
    root = Path(__file__).parents[1] / "recipes"
    for name, run in (("smollm2_90", "recon-heal"), ("smollm2_80", "recon-heal80")):
        study = Recipe.model_validate(regime.build_recipe(run, regime.LARGE, 0, lr=1e-3)).resolved_stages()
        shipped = load_recipe(root / f"{name}.yaml")
        assert shipped.distributed.mixed_precision == "auto" and shipped.seed == 0
        stages = shipped.resolved_stages()
        assert len(stages) == len(study) == 1
        for mine, theirs in zip(stages, study):
            assert (mine.target, mine.prune, mine.finetune) == (theirs.target, theirs.prune, theirs.finetune)
            assert mine.eval.hooks == theirs.eval.hooks and mine.eval.phases == theirs.eval.phases


@pytest.mark.parametrize("recipe, budget, seed", regime.TUNED_PLAN, ids=lambda v: str(v))
def test_every_tuned_run_is_valid_spends_its_budget_and_reports_the_tune_split(recipe, budget, seed):
    r = Recipe.model_validate(regime.build_recipe(recipe, budget, seed, lr=1e-3))
    stages = r.resolved_stages()
    assert sum(s.finetune.tokens for s in stages if s.finetune) == budget
    assert stages[-1].target == (0.8 if recipe.endswith("80") else 0.9)
    assert all(s.finetune.lr == 1e-3 for s in stages if s.finetune)
    assert all((s.prune.reconstruct is not None) == ("recon" in recipe) for s in stages)
    splits = {(h["source"], h.get("split", "test")) for h in stages[-1].eval.hooks if h["type"] == "perplexity"}
    assert splits == {("stdlib-docs", "test"), ("debian-licenses", "test"), ("stdlib-docs", "tune")}


def _tuned_run(out: Path, name: str, points: dict) -> None:
    folder = out / "runs" / name
    folder.mkdir(parents=True)
    for i, ((target, phase), (docs, licenses, tune)) in enumerate(sorted(points.items())):
        append_metrics(folder, {"stage": i, "name": f"s{round(target * 100)}", "phase": phase, "target": target,
                                "sparsity": target, "metrics": {"ppl/stdlib-docs": docs, "ppl/debian-licenses":
                                                                licenses, "ppl/stdlib-docs@tune": tune}})


def test_tuned_lr_is_chosen_on_the_tune_split_only(tmp_path):
    """The lr with the lowest tune perplexity wins even where the evaluation windows would pick another; none is
    chosen until every lr row has finished."""
    evaluation = {"3e-4": (50.0, 300.0, 40.0), "1e-3": (70.0, 500.0, 30.0)}  # the test windows prefer 3e-4
    for lr, values in evaluation.items():
        _tuned_run(tmp_path, regime.tune_name(lr), {(0.9, "finetuned"): values})
    assert regime.chosen_lr(tmp_path) is None  # 3e-3 has not run
    _tuned_run(tmp_path, regime.tune_name("3e-3"), {(0.9, "pruned"): (900.0, 900.0, 900.0)})
    assert regime.chosen_lr(tmp_path) is None  # nor finished
    append_metrics(tmp_path / "runs" / regime.tune_name("3e-3"), {
        "stage": 0, "name": "s90", "phase": "finetuned", "target": 0.9, "sparsity": 0.9,
        "metrics": {"ppl/stdlib-docs": 60.0, "ppl/debian-licenses": 400.0, "ppl/stdlib-docs@tune": 35.0}})
    assert regime.chosen_lr(tmp_path) == 1e-3


def test_tuned_report_puts_old_rows_beside_new_and_computes_the_levers(tmp_path):
    _tuned_run(tmp_path, "oneshot-heal-64k-s0", {(0.9, "pruned"): (1000.0, 4000.0, 800.0),
                                                 (0.9, "finetuned"): (50.0, 800.0, 20.0)})
    _tuned_run(tmp_path, "recon-heal-64k-s0", {(0.9, "pruned"): (100.0, 900.0, 70.0),
                                               (0.9, "finetuned"): (25.0, 400.0, 10.0)})
    _tuned_run(tmp_path, "recon-heal80-64k-s0", {(0.8, "pruned"): (40.0, 300.0, 20.0),
                                                 (0.8, "finetuned"): (20.0, 200.0, 9.0)})
    names = [regime.run_name(*r) for r in regime.TUNED_PLAN]
    md = report.write_tuned_report(tmp_path, {"metrics": {"ppl/stdlib-docs": 15.0, "ppl/debian-licenses": 40.0}},
                                   1e-3, names, {lr: regime.tune_name(lr) for lr in regime.TUNE_LRS})
    assert "Tuned rows: lr 0.001, chosen on the tune split" in md
    assert "| tuned | recon-heal80 | 65,536 | 0 | 20.0 | - |" in md  # an 80 % run's row has no 90 % cells
    assert "| tuned | recon | 0 | 0 | - | 100.0 | 6.7 | - | 900.0 | 70.0 | - |" in md  # its model before healing
    assert "| 12-01 | oneshot-heal | 65,536 | 0 | - | 169.0 |" in md  # the first study's row, kept
    assert "| lr (1e-4 -> chosen) | 65,536 | 169.0 -> 50.0 (0.30x) | 977.1 -> 800.0 (0.82x) |" in md
    assert "| reconstruction before healing | 65,536 | 50.0 -> 25.0 (0.50x) | 800.0 -> 400.0 (0.50x) |" in md
    assert "| reconstruction, no healing | 0 | 1000.0 -> 100.0 (0.10x) | 4000.0 -> 900.0 (0.23x) |" in md


def test_a_run_is_finished_only_when_every_stage_of_its_recipe_is_complete(tmp_path):
    from sparsegpt.run.rundir import Phase, RunDir, RunState, StageState

    recipe = Recipe.model_validate(regime.build_recipe("prog4", regime.SMALL, 0))
    rd = RunDir(tmp_path / "prog4-16k-s0")
    rd.create(recipe)
    assert not regime.finished(rd.root)
    rd.save_state(RunState(stages={0: StageState(name="s50", done=[Phase.PRUNE, Phase.COMPLETE])}))
    assert not regime.finished(rd.root)  # state.json lists only the stages begun: 1 of 4 is not the run
    rd.save_state(RunState(stages={i: StageState(name=s.name, done=[Phase.COMPLETE])
                                   for i, s in enumerate(recipe.stage_list())}))
    assert regime.finished(rd.root)
