"""compare/report on hand-written run dirs (tables, CSV, a PNG that is opened and inspected), error cases,
and the eval command on a tiny saved model."""

import argparse
import csv
import json
from pathlib import Path

import pytest
import torch
from matplotlib.image import imread

from sparsegpt.commands import compare as compare_cmd
from sparsegpt.commands import eval as eval_cmd
from sparsegpt.commands import report as report_cmd
from sparsegpt.core.errors import UserError
from sparsegpt.run.compare import (
    best_per_target,
    choose_metric,
    load_runs,
    lower_is_better,
    metric_table,
    write_compare,
    write_report,
)

torch.set_num_threads(1)


def write_run(run_dir: Path, values: dict[float, dict[str, float]], *, ppl_key: str = "ppl/stdlib-docs",
              state: bool = False) -> Path:
    """A run dir whose metrics.jsonl has one record per (target, phase) in `values` ({target: {phase: ppl}})."""
    run_dir.mkdir(parents=True)
    lines, stages = [], {}
    for stage, (target, phases) in enumerate(values.items()):
        for phase, ppl in phases.items():
            metrics = {ppl_key: ppl, "lm_eval/arc_easy/acc": 0.7 - 0.5 * target + (phase == "finetuned") * 0.05,
                       "sparsity/overall": target, "samples": [{"prompt": "Hi", "completion": " there"}]}
            rec = {"stage": stage, "name": f"s{int(target * 100)}", "phase": phase, "target": target,
                   "sparsity": target + 0.0001, "metrics": metrics, "seconds": 100.0 + stage, "time": 1.7e9 + stage}
            if phase == "pruned" and stage == 1:
                rec["errors"] = {"lm_eval/hellaswag": "RuntimeError: CUDA out of memory"}
            lines.append(json.dumps(rec))
        stages[str(stage)] = {"name": f"s{int(target * 100)}", "done": ["prune", "eval_pruned"],
                              "seconds": {"prune": 60.0 + stage, "eval_pruned": 40.0, "complete": 0.0}}
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    if state:
        (run_dir / "state.json").write_text(json.dumps({"stages": stages, "fingerprint": "x", "created": 1.7e9}))
    return run_dir


@pytest.fixture
def runs(tmp_path):
    progressive = write_run(tmp_path / "progressive", {0.5: {"pruned": 30.0, "finetuned": 20.0},
                                                       0.7: {"pruned": 80.0, "finetuned": 35.0},
                                                       0.9: {"pruned": 900.0, "finetuned": 120.0}}, state=True)
    oneshot = write_run(tmp_path / "oneshot", {0.5: {"pruned": 25.0}, 0.7: {"pruned": 150.0},
                                               0.9: {"pruned": 4000.0}})
    return [progressive, oneshot]


def test_compare_writes_table_csv_and_png(runs, tmp_path):
    loaded = load_runs(runs)
    metric = choose_metric(loaded)
    assert metric == "ppl/stdlib-docs"
    md = write_compare(loaded, metric, tmp_path / "cmp")
    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert table[0] == ("| target | progressive after prune | progressive after fine-tune | oneshot after prune "
                        "| oneshot after fine-tune |")
    assert table[1:] == ["| 0.5 | 30 | 20 | 25 | - |", "| 0.7 | 80 | 35 | 150 | - |", "| 0.9 | 900 | 120 | 4000 | - |"]
    assert "- 0.5: **progressive** (after fine-tune, 20)" in md  # 20 (fine-tuned) beats oneshot's 25
    assert "- 0.9: **progressive** (after fine-tune, 120)" in md
    assert (tmp_path / "cmp" / "compare.md").read_text() == md

    with open(tmp_path / "cmp" / "compare.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0][0] == "target" and len(rows) == 4
    assert [float(v) if v else None for v in rows[3]] == [0.9, 900.0, 120.0, 4000.0, None]

    image = imread(tmp_path / "cmp" / "compare.png")
    assert image.shape[:2] == (500, 800)
    rgb = image[..., :3]
    non_white = (rgb < 0.95).any(-1).mean()
    assert 0.01 < non_white < 0.5  # axes, lines, text: drawn, but not a filled canvas
    colored = (rgb.max(-1) - rgb.min(-1) > 0.3).mean()
    assert colored > 0.001  # the coloured run lines are there, not just black axes


def test_accuracy_metric_higher_is_better(runs):
    loaded = load_runs(runs)
    best = best_per_target(loaded, "lm_eval/arc_easy/acc")
    assert best[0.7] == ("progressive", "finetuned", pytest.approx(0.7 - 0.35 + 0.05))
    header, rows = metric_table(loaded, "lm_eval/arc_easy/acc")
    assert rows[0][1:3] == [pytest.approx(0.45), pytest.approx(0.5)]


@pytest.mark.parametrize("metric, lower", [
    ("ppl/wikitext2", True), ("lm_eval/wikitext/word_perplexity", True), ("lm_eval/wikitext/bits_per_byte", True),
    ("probe/loss", True), ("lm_eval/arc_easy/acc", False), ("lm_eval/arc_easy/acc_norm", False),
    ("lm_eval/squad/f1", False)])
def test_lower_is_better_from_name(metric, lower):
    assert lower_is_better(metric) is lower


def test_compare_errors(runs, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty has no metrics.jsonl"):
        load_runs([runs[0], tmp_path / "empty"])
    loaded = load_runs(runs)
    with pytest.raises(UserError, match="metric 'ppl/c4' is not in run\\(s\\) progressive, oneshot; available: "
                                        "progressive: ppl/stdlib-docs"):
        choose_metric(loaded, "ppl/c4")
    other = write_run(tmp_path / "c4run", {0.5: {"pruned": 9.0}}, ppl_key="ppl/c4")
    with pytest.raises(UserError, match="no ppl/\\* metric is common to all runs; pass --metric NAME; each run has: "
                                        "progressive: ppl/stdlib-docs, .*; c4run: ppl/c4, "
                                        "lm_eval/arc_easy/acc, sparsity/overall$"):
        choose_metric(load_runs([runs[0], other]))


def test_report_has_stage_times_and_sparsity(runs, tmp_path):
    md = write_report(runs[0], tmp_path / "rep")
    tables = [line for line in md.splitlines() if line.startswith("| ")]
    assert tables[0] == ("| stage | name | target | sparsity pruned | sparsity finetuned | ppl/stdlib-docs after prune "
                         "| ppl/stdlib-docs after fine-tune |")
    assert tables[1] == "| 0 | s50 | 0.5 | 0.5001 | 0.5001 | 30 | 20 |"
    assert tables[4] == "| stage | name | pruned phase | finetuned phase | state: prune | state: eval_pruned |"
    assert tables[6] == "| 1 | s70 | 101 | 101 | 61 | 40 |"
    assert "stage 1 pruned: lm_eval/hellaswag: RuntimeError: CUDA out of memory" in md
    assert imread(tmp_path / "rep" / "report.png").shape[:2] == (500, 800)
    assert (tmp_path / "rep" / "report.csv").read_text().splitlines()[1].startswith("0,s50,0.5,0.5001,0.5001,30.0,20.0")
    write_report(runs[1])  # no state.json: metrics times only, written into the run dir
    assert "state:" not in (runs[1] / "report.md").read_text()


def parse(module, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return parser.parse_args(argv)


def test_compare_and_report_commands(runs, tmp_path, capsys):
    out = tmp_path / "cli"
    assert compare_cmd.run(parse(compare_cmd, [*map(str, runs), "--metric", "lm_eval/arc_easy/acc",
                                               "--out", str(out)])) == 0
    printed = capsys.readouterr().out
    assert "lm_eval/arc_easy/acc by target sparsity (higher is better)" in printed
    assert {p.name for p in out.iterdir()} == {"compare.md", "compare.csv", "compare.png"}
    assert report_cmd.run(parse(report_cmd, [str(runs[0])])) == 0
    assert "| 2 | s90 | 0.9 |" in capsys.readouterr().out
    with pytest.raises(UserError, match="no metrics.jsonl"):
        report_cmd.run(parse(report_cmd, [str(tmp_path)]))


def test_eval_command_on_saved_tiny_model(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    from test_evaluation import byte_tokenizer, prune_by_hand, tiny_llama

    from sparsegpt.core.masks import MaskSet

    model, tokenizer = tiny_llama(), byte_tokenizer()
    masks = MaskSet(prune_by_hand(model))
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    masks.save(tmp_path / "model" / "mask.safetensors")
    args = parse(eval_cmd, ["--model", str(tmp_path / "model"), "--ppl", "stdlib-docs", "--seqlen", "32",
                            "--max-windows", "2", "--sparsity", "--samples", "Hi", "--max-new-tokens", "2",
                            "--device", "cpu", "--out", str(tmp_path / "r.json")])
    assert eval_cmd.run(args) == 0
    result = json.loads((tmp_path / "r.json").read_text())["metrics"]
    assert result["sparsity/overall"] == pytest.approx(masks.sparsity())
    assert result["ppl/stdlib-docs"] > 1 and result["samples"][0]["prompt"] == "Hi"
    assert "sparsity/overall: " in capsys.readouterr().out
    bad = parse(eval_cmd, ["--model", str(tmp_path / "model"), "--ppl", "nope-corpus", "--device", "cpu"])
    with pytest.raises(UserError, match="unknown text source 'nope-corpus'"):
        eval_cmd.run(bad)
    assert eval_cmd.hooks_from_args(parse(eval_cmd, ["--model", "m"])) == [
        {"type": "perplexity", "source": "stdlib-docs", "seqlen": None, "max_windows": None, "batch_size": 4,
         "layerwise": False}, {"type": "sparsity"}]
