"""The 80-90 % regime study: which recipe buys the most from a fixed fine-tuning token budget (SmolLM2-135M).

    python bench/regime/regime.py --out runs/regime           # the whole study (plan below), resumable, then the report
    python bench/regime/regime.py --out runs/regime --plan    # the planned runs and their recipes; runs nothing
    python bench/regime/regime.py --out runs/regime --report  # table + plots from the runs finished so far

Every run is one recipe (written to OUT/recipes/, run with train/progressive.py, one process, fp32, the same
thread count); all share the model, calibration (stdlib-docs, 32 x 128 tokens), fine-tuning text (stdlib-docs
train split, the same seeded data order), optimiser (AdamW, lr 1e-4, 10 % warm-up, cosine per stage, micro-batch
4 x 128 tokens) and evaluation: 32 x 128-token validation windows of stdlib-docs (the fine-tuning domain) and of
debian-licenses (held out: never trained or calibrated on). A budget is the total of fine-tuning tokens of a run.

Recipes (the issue's list; how each spends the budget):
  a  oneshot        SparseGPT to 90 % once, no healing (the 'pruned' evaluation of b's run: identical model)
  b  oneshot-heal   SparseGPT to 90 % once, the whole budget fine-tuning at 90 %
  c  prog4          50 -> 70 -> 80 -> 90 %, the budget split equally over the 4 stages
  d  prog4-kd       c + logit distillation from the dense model (CE + KL(teacher||student), T = 1)
  d2 prog4-sqhead   c + SquareHead (CE + KL + normalised per-layer hidden MSE, Kurtic et al. 2023)
  e  gmp4           c with magnitude pruning instead of SparseGPT (gradual magnitude pruning, Zhu & Gupta 2017,
                    on the same 4-step schedule: prune by |w| among survivors, heal, repeat)
  f  prog5          50 -> 60 -> 70 -> 80 -> 90 %, budget split equally over 5 stages
  g  prog4-owl      c with OWL layer-wise sparsity allocation (outlier-weighted, lambda 0.08, M 5)
  h  prog4-kd-final d with the budget split 1:1:1:3 (half of it healing at 90 %; `budget.weights`)

The report (OUT/regime.md, OUT/regime.json, OUT/regime_sparsity.png, OUT/regime_tokens.png) gives per recipe and
budget the perplexity at 80 % and 90 % in both domains (mean over seeds, and the spread where there are two),
the seconds each run took, and the dense model's perplexities for scale.

`--study tuned` (issue 20, item 4) re-runs it on the tuned toolkit, in its own OUT (runs/regime-tuned):
  1. lr, chosen on the tune split only: recon-heal (SparseGPT 90 % + layer-wise reconstruction, then 16 k tokens)
     at each of TUNE_LRS; every run also reports perplexity on 16 x 128 windows of the stdlib-docs *tune* split
     (`ppl/stdlib-docs@tune`), and the lr with the lowest tune perplexity is the study's lr (`chosen_lr`; the
     evaluation windows are never read to choose).
  2. every tuned recipe at that lr: the earlier ones (oneshot-heal, prog4, prog4-kd, prog4-sqhead) and the new
     ones with reconstruction (recon-heal, recon-heal80 for 80 % with the whole budget, prog4-recon,
     recon-heal-kd), at 16 k and 64 k tokens, second seeds where the comparison is close. One-shot + reconstruction
     without fine-tuning is the recon-heal runs' 'pruned' evaluation (as oneshot is oneshot-heal's).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from sparsegpt.config.recipe import load_recipe
from sparsegpt.run.rundir import Phase, read_metrics, read_state

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ("stdlib-docs", "debian-licenses")
WINDOWS, SEQLEN = 32, 128
MICRO_BATCH = 4
PROGRESSIVE4 = (0.5, 0.7, 0.8, 0.9)
PROGRESSIVE5 = (0.5, 0.6, 0.7, 0.8, 0.9)
KD_LOGIT = {"teacher": "dense", "logit_weight": 1.0, "ce_weight": 1.0, "temperature": 1.0}
KD_SQUAREHEAD = {**KD_LOGIT, "hidden_weight": 1.0}

# name -> (targets, prune overrides, finetune overrides, budget weights per stage)
RECIPES = {
    "oneshot-heal": ((0.9,), {}, {}, None),
    "prog4": (PROGRESSIVE4, {}, {}, None),
    "prog4-kd": (PROGRESSIVE4, {}, {"kd": KD_LOGIT}, None),
    "prog4-sqhead": (PROGRESSIVE4, {}, {"kd": KD_SQUAREHEAD}, None),
    "gmp4": (PROGRESSIVE4, {"method": "magnitude"}, {}, None),
    "prog5": (PROGRESSIVE5, {}, {}, None),
    "prog4-owl": (PROGRESSIVE4, {"allocation": "owl"}, {}, None),
    "prog4-kd-final": (PROGRESSIVE4, {}, {"kd": KD_LOGIT}, (1, 1, 1, 3)),
}
SMALL, LARGE = 16384, 65536
# The study as recorded in bench/RESULTS.md, in the order it ran: the large budget for the two contenders (all
# tokens at 90 % vs progressive + KD), the key comparison at the small budget (with a second seed for the spread),
# the other recipes at the small budget, then the large budget for the recipes the small one did not rule out
# (prog4, SquareHead; not OWL, GMP or prog5: each worse than prog4 on both domains at the small budget), the second
# seeds of the progressive recipes and the 1:1:1:3 split.
PLAN = (
    [("oneshot-heal", LARGE, 0), ("prog4-kd", LARGE, 0)]
    + [("prog4-kd", SMALL, 0), ("oneshot-heal", SMALL, 0), ("prog4", SMALL, 0), ("oneshot-heal", SMALL, 1)]
    + [(name, SMALL, 0) for name in ("prog4-sqhead", "prog4-owl", "gmp4")]
    + [("prog5", SMALL, 0), ("prog4-sqhead", LARGE, 0), ("prog4", LARGE, 0), ("prog4-kd", SMALL, 1)]
    + [("prog4", SMALL, 1), ("prog4-kd-final", SMALL, 0)]
)


# The tuned study (`--study tuned`): name -> (targets, prune overrides, finetune overrides, budget weights)
# 4 Adam passes at 3e-3 on the pruned inputs: the defaults when the study started (the first runs' recipes say
# `reconstruct: {}`); now 3 passes at 4e-3, equal on the tune split (bench/prune/results_reconstruct.md)
RECON = {"reconstruct": {"passes": 4, "lr": 3.0e-3}}
TUNED_RECIPES = {
    "oneshot-heal": ((0.9,), {}, {}, None),
    "recon-heal": ((0.9,), RECON, {}, None),
    "recon-heal80": ((0.8,), RECON, {}, None),
    "recon-heal-kd": ((0.9,), RECON, {"kd": KD_LOGIT}, None),
    "prog4": (PROGRESSIVE4, {}, {}, None),
    "prog4-recon": (PROGRESSIVE4, RECON, {}, None),
    "prog4-kd": (PROGRESSIVE4, {}, {"kd": KD_LOGIT}, None),
    "prog4-sqhead": (PROGRESSIVE4, {}, {"kd": KD_SQUAREHEAD}, None),
}
TUNE_LRS = ("3e-4", "1e-3", "3e-3")
TUNE_RECIPE = "recon-heal"
TUNE_KEY = "ppl/stdlib-docs@tune"
# After the lr rows: the large budget for the recipes that carry the answer (Done-when at 90 % and 80 %; the lever
# rows: lr alone, + reconstruction, + schedule), then the small budget (+ KD, SquareHead, reconstruction in the
# progressive schedule, KD after reconstruction) and second seeds of the small budget's closest comparison. Left out
# for time (2 shared cores, ~2.5 h, 64 k tokens ~30 min a run): KD rows and second seeds at 64 k (the 12-01 study
# found KD within noise of prog4 at 64 k; recon-heal-kd at 64 k, added when KD after reconstruction moved the
# held-out text most at 16 k, was started and stopped unfinished for time), recon-heal80 at 16 k.
TUNED_PLAN = (
    [("recon-heal", LARGE, 0), ("recon-heal80", LARGE, 0), ("oneshot-heal", LARGE, 0), ("prog4", LARGE, 0)]
    + [(name, SMALL, 0) for name in ("oneshot-heal", "prog4", "prog4-recon", "prog4-kd", "recon-heal-kd",
                                     "prog4-sqhead")]
    + [("recon-heal", SMALL, 1), ("oneshot-heal", SMALL, 1)]
)


def tune_name(lr: str) -> str:
    return f"{TUNE_RECIPE}-lr{lr}-{SMALL // 1024}k-s0"


def chosen_lr(out: Path) -> float | None:
    """The lr of TUNE_LRS whose recon-heal run reached the lowest tune-split perplexity; None until all finished."""
    scores = {}
    for lr in TUNE_LRS:
        records = [r for r in read_metrics(out / "runs" / tune_name(lr)) if r["phase"] == "finetuned"] \
            if (out / "runs" / tune_name(lr) / "metrics.jsonl").is_file() else []
        if not records:
            return None
        scores[lr] = records[-1]["metrics"][TUNE_KEY]
    return float(min(scores, key=scores.get))


def run_name(recipe: str, budget: int, seed: int) -> str:
    return f"{recipe}-{budget // 1024}k-s{seed}"


def build_recipe(recipe: str, budget: int, seed: int, *, lr: float | None = None, name: str | None = None) -> dict:
    """The progressive-run recipe of one study run (plain YAML data); `lr` given: a run of the tuned study."""
    targets, prune, finetune, weights = (RECIPES if lr is None else TUNED_RECIPES)[recipe]
    hooks = [{"type": "perplexity", "source": s, "seqlen": SEQLEN, "max_windows": WINDOWS} for s in SOURCES]
    if lr is not None:
        hooks.append({"type": "perplexity", "source": "stdlib-docs", "split": "tune", "seqlen": SEQLEN,
                      "max_windows": WINDOWS // 2})
    # evaluated: each stage at 80 % and above after its fine-tune (and the one-shot recipe's model before it,
    # which is recipe (a)); earlier stages are not (each evaluation costs ~75 s here; the two large-budget runs of
    # 2026-12-01 were started before this rule and evaluated every stage, both phases at 90 %)
    stages = [{"name": f"s{round(t * 100)}", "target": t} for t in targets]
    for stage in stages:
        if stage["target"] < 0.8:
            stage["eval"] = {"phases": []}
    if len(stages) == 1:
        stages[0]["eval"] = {"phases": ["pruned", "finetuned"]}
    return {
        "name": name or run_name(recipe, budget, seed),
        "model": "smollm2-135m",
        "dtype": "float32",
        "seed": seed,
        "data": {"calibration": "stdlib-docs", "finetune": "stdlib-docs", "eval": list(SOURCES)},
        "distributed": {"zero_stage": 0, "micro_batch_size": MICRO_BATCH, "grad_accum": 1, "mixed_precision": "no"},
        "budget": {"tokens": budget, **({"weights": list(weights)} if weights else {})},
        "defaults": {
            "prune": {"method": "sparsegpt", "nsamples": 32, "seqlen": SEQLEN, "batch_size": 8, **prune},
            "finetune": {"seqlen": SEQLEN, "lr": 1.0e-4 if lr is None else lr, "warmup_ratio": 0.1,
                         "schedule": "cosine", "max_grad_norm": 1.0, "log_every": 8, **finetune},
            "eval": {"hooks": hooks + [{"type": "sparsity"}], "phases": ["finetuned"]},
        },
        "stages": stages,
    }


def write_recipes(out: Path, plan: list[tuple[str, int, int]], lr: float | None = None,
                  names: list[str] | None = None) -> list[tuple[str, Path]]:
    folder = out / "recipes"
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for i, (recipe, budget, seed) in enumerate(plan):
        name = names[i] if names else run_name(recipe, budget, seed)
        path = folder / f"{name}.yaml"
        text = yaml.safe_dump(build_recipe(recipe, budget, seed, lr=lr, name=name), sort_keys=False)
        started = (out / "runs" / name / "recipe.yaml").exists()
        if not started and (not path.exists() or path.read_text() != text):
            path.write_text(text)  # a started run keeps the recipe it was started with (its run dir checks it)
        written.append((name, path))
    return written


def tuned_runs(out: Path) -> tuple[list[tuple[str, Path]], list[tuple[str, Path]]]:
    """(the lr rows, the rest at the chosen lr: empty until the lr rows finished)."""
    lr_rows = []
    for lr in TUNE_LRS:
        lr_rows += write_recipes(out, [(TUNE_RECIPE, SMALL, 0)], lr=float(lr), names=[tune_name(lr)])
    lr = chosen_lr(out)
    return lr_rows, ([] if lr is None else write_recipes(out, list(TUNED_PLAN), lr=lr))


def run_all(out: Path, runs: list[tuple[str, Path]], jobs: int, threads: int) -> None:
    todo = [(n, r) for n, r in runs if not finished(out / "runs" / n)]
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        for name, rc, seconds in pool.map(lambda nr: run_one(*nr, out, threads), todo):
            print(f"{name}: exit {rc} after {seconds:.0f} s", flush=True)


def run_one(name: str, recipe: Path, out: Path, threads: int) -> tuple[str, int, float]:
    """Run (or resume) one study run; its log goes to OUT/logs/NAME.log."""
    env = _env(threads)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    start = time.time()
    with open(out / "logs" / f"{name}.log", "a") as log:
        rc = subprocess.call([sys.executable, str(ROOT / "train" / "progressive.py"), "--recipe", str(recipe),
                              "--run-dir", str(out / "runs" / name)], env=env, stdout=log, stderr=subprocess.STDOUT)
    return name, rc, time.time() - start


def _env(threads: int) -> dict[str, str]:
    """Every study process: the same thread count, offline, no progress bars."""
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "SPARSEGPT_NO_PROGRESS": "1"}


def finished(run_dir: Path) -> bool:
    """Whether every stage of the run dir's recipe is complete (state.json lists only the stages begun so far)."""
    state = read_state(run_dir)
    if state is None or not (run_dir / "recipe.yaml").is_file():
        return False
    n_stages = len(load_recipe(run_dir / "recipe.yaml").stage_list())
    return sum(Phase.COMPLETE in entry.done for entry in state.stages.values()) == n_stages


def dense_metrics(out: Path, threads: int) -> dict:
    """The dense model's perplexities on the study's windows (computed once, cached in OUT/dense.json)."""
    path = out / "dense.json"
    if not path.is_file():
        subprocess.check_call([sys.executable, "-m", "sparsegpt.cli", "eval", "--model", "smollm2-135m",
                               "--ppl", ",".join(SOURCES), "--seqlen", str(SEQLEN), "--max-windows", str(WINDOWS),
                               "--out", str(path)], env=_env(threads))
    return json.loads(path.read_text())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--out", type=Path, default=Path("runs/regime"))
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (each with --threads threads)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (the same for every run)")
    p.add_argument("--only", default=None, help="comma-separated run names of the plan to run (default: all)")
    p.add_argument("--plan", action="store_true", help="write the recipes and print the plan; run nothing")
    p.add_argument("--report", action="store_true", help="only write the report from finished runs")
    p.add_argument("--study", choices=("2026-12-01", "tuned"), default="2026-12-01",
                   help="the first study (lr 1e-4, no reconstruction) or its re-run on the tuned toolkit")
    args = p.parse_args()
    if args.study == "tuned":
        return tuned_main(args)
    plan = list(PLAN)
    if args.only:
        wanted = set(args.only.split(","))
        plan = [r for r in plan if run_name(*r) in wanted]
        if missing := wanted - {run_name(*r) for r in plan}:
            p.error(f"--only names runs not in the plan: {', '.join(sorted(missing))}")
    runs = write_recipes(args.out, plan)
    if args.plan:
        for name, path in runs:
            status = "done" if finished(args.out / "runs" / name) else "to run"
            print(f"{name:28s} {status:7s} {path}")
        return 0
    if not args.report:
        dense_metrics(args.out, args.threads)
        run_all(args.out, runs, args.jobs, args.threads)
    from regime_report import write_report  # noqa: E402 -- matplotlib only when reporting

    print(write_report(args.out, dense_metrics(args.out, args.threads), [run_name(*r) for r in PLAN]))
    return 0


def tuned_main(args) -> int:
    """The tuned study: the lr rows, the lr chosen on the tune split, then the plan at that lr (or --only's runs)."""
    lr_rows, rest = tuned_runs(args.out)
    if args.plan:
        lr = chosen_lr(args.out)
        print(f"lr: {'chosen on the tune split: ' + repr(lr) if lr else 'not chosen yet (lr rows unfinished)'}")
        for name, path in lr_rows + rest:
            print(f"{name:32s} {'done' if finished(args.out / 'runs' / name) else 'to run':7s} {path}")
        return 0
    if not args.report:
        dense_metrics(args.out, args.threads)
        run_all(args.out, lr_rows, args.jobs, args.threads)
        lr_rows, rest = tuned_runs(args.out)
        if args.only:
            rest = [r for r in rest if r[0] in set(args.only.split(","))]
        run_all(args.out, rest, args.jobs, args.threads)
    from regime_report import write_tuned_report  # noqa: E402 -- matplotlib only when reporting

    names = list(dict.fromkeys(run_name(*r) for r in TUNED_PLAN))
    lr = chosen_lr(args.out)
    lr_runs = {text: tune_name(text) for text in TUNE_LRS}
    # the lr row that was chosen is the plan's recon-heal at the small budget, seed 0 (the same recipe)
    chosen = {run_name(TUNE_RECIPE, SMALL, 0): lr_runs[t] for t in TUNE_LRS if lr is not None and float(t) == lr}
    print(write_tuned_report(args.out, dense_metrics(args.out, args.threads), lr, [*chosen, *names], lr_runs,
                             chosen))
    return 0


if __name__ == "__main__":
    sys.exit(main())
