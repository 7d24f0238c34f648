"""Choosing the healing lr on the tune split (`lr: auto`) vs a fixed lr, SmolLM2-135M one-shot to 90 %.

    OMP_NUM_THREADS=1 python bench/heal/lr_search.py --out runs/lr-search                # auto + 1e-4, then the table
    OMP_NUM_THREADS=1 python bench/heal/lr_search.py --out runs/lr-search --runs 1e-3    # more fixed-lr runs
    OMP_NUM_THREADS=1 python bench/heal/lr_search.py --out runs/lr-search --runs auto-4096  # 4096 probe tokens
    python bench/heal/lr_search.py --out runs/lr-search --report [--tune-ppl]            # the tables only

The issue 20 set-up as one-stage recipes: SparseGPT to 90 % on 32 x 128 stdlib-docs calibration tokens, then 32
steps of 4 x 128 tokens (16 k) of fp32 healing on stdlib-docs train, 3 warm-up steps, cosine, AdamW; perplexity on
32 x 128 test windows of stdlib-docs and debian-licenses (held out) after pruning and after healing. `auto` uses the
default candidates (1e-4, 3e-4, 1e-3, 3e-3), probes (an eighth of the stage each) and 16 tune windows. Runs are
resumable (train/progressive.py run dirs under OUT/runs) and run in parallel (`--jobs`).
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

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ("stdlib-docs", "debian-licenses")


def recipe(run: str) -> dict:
    """`run`: a fixed lr ("1e-4"), "auto", or "auto-N" (lr: auto with N probe tokens per candidate)."""
    hooks = [{"type": "perplexity", "source": s, "seqlen": 128, "max_windows": 32} for s in SOURCES]
    lr, _, probe = run.partition("-") if run.startswith("auto") else (run, "", "")
    finetune = {"lr_search": {"tokens": int(probe)}} if probe else {}
    return {
        "name": f"lr-{run}", "model": "smollm2-135m", "dtype": "float32", "seed": 0,
        "data": {"calibration": "stdlib-docs", "finetune": "stdlib-docs", "eval": list(SOURCES)},
        "distributed": {"zero_stage": 0, "micro_batch_size": 4, "grad_accum": 1, "mixed_precision": "no"},
        "defaults": {
            "prune": {"method": "sparsegpt", "nsamples": 32, "seqlen": 128, "batch_size": 8},
            "finetune": {"steps": 32, "seqlen": 128, "lr": lr if lr == "auto" else float(lr), "warmup_steps": 3,
                         "schedule": "cosine", "max_grad_norm": 1.0, "log_every": 8, **finetune},
            "eval": {"hooks": hooks + [{"type": "sparsity"}], "phases": ["pruned", "finetuned"]},
        },
        "stages": [{"name": "s90", "target": 0.9}],
    }


def run_one(out: Path, lr: str) -> tuple[str, int, float]:
    path = out / "recipes" / f"lr-{lr}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe(lr), sort_keys=False))
    (out / "logs").mkdir(exist_ok=True)
    env = {**os.environ, "SPARSEGPT_NO_PROGRESS": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    start = time.time()
    with open(out / "logs" / f"lr-{lr}.log", "a") as log:
        rc = subprocess.call([sys.executable, str(ROOT / "train" / "progressive.py"), "--recipe", str(path),
                              "--run-dir", str(out / "runs" / f"lr-{lr}")], env=env, stdout=log,
                             stderr=subprocess.STDOUT)
    return lr, rc, time.time() - start


def report(out: Path) -> str:
    rows = ["| run | lr used | stdlib-docs (trained domain) | debian-licenses (held out) | fine-tune phase s |",
            "|---|---|---|---|---|"]
    searches, pruned = [], None
    for run in sorted((out / "runs").glob("lr-*")):
        lines = (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").exists() else []
        recs = {r["phase"]: r for r in map(json.loads, lines)}
        if "finetuned" not in recs:
            continue
        state = json.loads((run / "state.json").read_text())
        seconds = state["stages"]["0"]["seconds"].get("finetune")
        record = run / "stages" / "00-s90" / "lr_search.json"
        lr = json.loads(record.read_text())["chosen"] if record.exists() else float(run.name[3:])
        m = recs["finetuned"]["metrics"]
        rows.append(f"| {run.name} | {lr:g} | {m['ppl/stdlib-docs']:.1f} | {m['ppl/debian-licenses']:.1f} | "
                    f"{seconds:.0f} |")
        pruned = recs.get("pruned", {}).get("metrics")
    for run in sorted((out / "runs").glob("lr-auto*")):
        record = run / "stages" / "00-s90" / "lr_search.json"
        if record.exists():
            searches.append((run.name, json.loads(record.read_text())))
    if pruned:
        rows.append(f"| one-shot, no healing | - | {pruned['ppl/stdlib-docs']:.1f} | "
                    f"{pruned['ppl/debian-licenses']:.1f} | - |")
    for name, search in searches:
        rows += ["", f"{name}: search ({search['source']} tune split, {search['windows']} x {search['seqlen']} "
                     f"windows; {search['steps']} probe steps of {search['stage_steps']}, warm-up "
                     f"{search['warmup_steps']}; cost {search['cost']:.0%} of the stage's tokens):", "",
                 "| candidate lr | tune ppl | probe final loss | probe s |", "|---|---|---|---|"]
        rows += [f"| {r['lr']:g} | {r['ppl']:.1f} | {r['final_loss']:.3f} | {r['seconds']:.0f} |"
                 if r["ppl"] is not None else f"| {r['lr']:g} | diverged | - | {r['seconds']:.0f} |"
                 for r in search["results"]]
        rows += [f"chosen: {search['chosen']:g}" if "chosen" in search else "(search unfinished)"]
    return "\n".join(rows)


def tune_ppl(out: Path, windows: int = 16) -> str:
    """Each finished run's final model scored on the search's tune windows: does the tune split rank full-length
    runs as the evaluation windows do (then a wrong pick is the probes' fault, not the split's)?"""
    from sparsegpt.evaluate.perplexity import perplexity
    from sparsegpt.run.lr_search import tune_windows
    from sparsegpt.storage.models import load_model

    rows = [f"| run | tune ppl ({windows} x 128, final model) |", "|---|---|"]
    for run in sorted((out / "runs").glob("lr-*")):
        folder = run / "stages" / "00-s90" / "model"
        if folder.is_dir():
            model, tok = load_model(str(folder), dtype="float32")
            ppl = perplexity(model, tune_windows("stdlib-docs", tok, seqlen=128, windows=windows), batch_size=4)
            rows.append(f"| {run.name} | {ppl:.1f} |")
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--runs", nargs="+", default=["auto", "1e-4"],
                        help="'auto', 'auto-N' (N probe tokens per candidate) and/or fixed lrs")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (each OMP_NUM_THREADS threads)")
    parser.add_argument("--report", action="store_true", help="print the table of finished runs; run nothing")
    parser.add_argument("--tune-ppl", action="store_true", help="also score each finished model on the tune windows")
    args = parser.parse_args()
    if not args.report:
        with concurrent.futures.ProcessPoolExecutor(args.jobs) as pool:
            for lr, rc, seconds in pool.map(run_one, [args.out] * len(args.runs), args.runs):
                print(f"lr-{lr}: exit {rc} after {seconds:.0f} s", flush=True)
    print(report(args.out))
    if args.tune_ppl:
        print("\n" + tune_ppl(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
