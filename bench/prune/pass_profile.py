"""Where a SparseGPT pass spends its time, phase by phase, and the same pass on an older checkout for comparison.

Each run is a fresh child process: load the model, draw the calibration set, `prune_model` (one process), then
held-out perplexity. The phases are the pass's own timers (`PruneResult.world`, `distributed.PHASES`): capture,
layer forwards, Hessian sums (inside the forwards), factorizations (inside the solves), solves, propagation, layer
I/O. `--baseline DIR` also runs the pass with the sparsegpt package of DIR (e.g. a worktree of main:
`git worktree add /tmp/main-old main`) in the same way, alternating old and new `--repeats` times so both see the
same machine load; a checkout whose pass has fewer timers reports those it has (its `forward` includes its Hessian
sums; its factorizations are timed by wrapping `inverse_hessian_factor`). `--variants` runs this checkout once
per setting (`PruneConfig.forward_dtype`, `+ts`: `true_sequential`, `+h16`: `hessian_dtype` bfloat16),
`--seeds` each column once per calibration seed.

example (what bench/prune/results_pass_speed.md was made with, c54bed9 extracted with `git archive` into
/tmp/basec54; each results file's header has its exact command):
  python bench/prune/pass_profile.py --threads 1 --baseline /tmp/basec54 \\
      --variants float32 float32+ts bfloat16+ts --seeds 0 1 2 3 --out bench/prune/results_pass_speed.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = [f"{d}{ts}{h}" for d in ("float32", "bfloat16", "auto") for ts in ("", "+ts") for h in ("", "+h16")]
PHASES = [("capture", "capture forward"), ("forward-hessian", "layer forwards (dense, with hooks)"),
          ("hessian", "Hessian sums Σxxᵀ"), ("communication", "communication"),
          ("factor", "inverse-Hessian factorizations"), ("solve-factor", "column loops, masks, errors"),
          ("propagate", "propagation (pruned forwards)"), ("io", "layer I/O")]


def use_package(package: str) -> None:
    """Import sparsegpt from `package` (a checkout's root, first on PYTHONPATH): an editable install's finder sits
    on sys.meta_path ahead of PYTHONPATH and would hand out its own checkout instead, so it is dropped here; the
    import is then checked."""
    sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
    import sparsegpt

    got = Path(sparsegpt.__file__).resolve().parents[1]
    if got != Path(package).resolve():
        raise SystemExit(f"imported sparsegpt from {got}, not from {package}")


def child(args) -> dict:
    """One pass in this process; its JSON row on the last stdout line."""
    use_package(os.environ["PYTHONPATH"].split(os.pathsep)[0])
    import torch

    from sparsegpt.core.data import calibration_ids, eval_ids
    from sparsegpt.evaluate.perplexity import perplexity
    from sparsegpt.prune import sequential
    from sparsegpt.storage.models import load_model

    torch.set_num_threads(args.threads)
    factor_seconds = [0.0]
    timed = "factor" not in getattr(sys.modules.get("sparsegpt.prune.distributed"), "PHASES", ())
    if timed:  # an older pass: time its factorizations from outside
        inner = sequential.inverse_hessian_factor

        def wrapped(*a, **kw):
            start = time.perf_counter()
            try:
                return inner(*a, **kw)
            finally:
                factor_seconds[0] += time.perf_counter() - start

        sequential.inverse_hessian_factor = wrapped
    model, tokenizer = load_model(args.model, dtype="float32")
    calib = calibration_ids(args.calib, tokenizer, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed)
    extra = {"forward_dtype": args.forward_dtype} if args.forward_dtype != "float32" else {}  # older: neither
    extra.update({"true_sequential": True} if args.true_sequential else {})
    extra.update({"hessian_dtype": args.hessian_dtype} if args.hessian_dtype != "float32" else {})
    cfg = sequential.PruneConfig(sparsity=args.sparsity, batch_size=args.batch_size, dtype=args.solver_dtype, **extra)
    load = os.getloadavg()[0]
    result = sequential.prune_model(model, calib, cfg)
    seconds = dict(result.world["ranks"][0]["seconds"])
    if timed:
        seconds["factor"] = factor_seconds[0]
    row = {"package": str(Path(sequential.__file__).parents[2]), "seed": args.seed,
           "forward_dtype": args.forward_dtype, "true_sequential": args.true_sequential,
           "hessian_dtype": args.hessian_dtype, "seconds": result.seconds,
           "phases": seconds,
           "layer_seconds": result.layer_seconds, "load_before": load, "load_after": os.getloadavg()[0],
           "sparsity": result.masks.sparsity(), "error_sum": sum(s["error"] for s in result.stats)}
    for source in args.eval_sources:
        ids = eval_ids(source, tokenizer, seqlen=args.seqlen, split="validation", max_windows=args.eval_windows)
        row[f"ppl/{source}"] = perplexity(model, ids, batch_size=args.batch_size, device="cpu")
    return row


def spawn(args, package: str, seed: int, variant: str) -> dict:
    """`child` in a fresh process importing sparsegpt from `package` (a checkout's root), one `--variants` entry."""
    forward_dtype, *flags = variant.split("+")
    argv = [*sys.argv[1:], "--seed", str(seed), "--forward-dtype", forward_dtype] + ["--true-sequential"] * (
        "ts" in flags) + ["--hessian-dtype", "bfloat16"] * ("h16" in flags)
    env = {**os.environ, "PYTHONPATH": package, "OMP_NUM_THREADS": str(args.threads), "SPARSEGPT_NO_PROGRESS": "1"}
    done = subprocess.run([sys.executable, __file__, *argv, "--child"], env=env, stdout=subprocess.PIPE, text=True,
                          check=True)
    row = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"{package} seed {seed} {variant}: {row['seconds']:.1f} s",
          {k: round(v, 1) for k, v in row["phases"].items()}, file=sys.stderr)
    return row


def phase(sec: dict, key: str) -> float | None:
    """A phase's own seconds: nested timers (hessian in forward, factor in solve) as their own line items."""
    if key == "forward-hessian":
        return sec["forward"] - sec.get("hessian", 0.0)
    if key == "solve-factor":
        return sec["solve"] - sec.get("factor", 0.0)
    return sec.get(key)


def mean(xs: list[float | None]) -> float | None:
    return None if any(x is None for x in xs) else sum(xs) / len(xs)


def report(args, started: datetime.datetime, cpu: str, runs: dict[str, list[dict]]) -> str:
    names = list(runs)
    lines = ["# Pruning pass profile", "",
             f"- date: {started:%Y-%m-%d %H:%M} UTC; machine: {cpu}, {os.cpu_count()} cores; torch threads "
             f"{args.threads}; load average (1 min) before / after each run: "
             + "; ".join(f"{n}: " + ", ".join(f"{r['load_before']:.1f}/{r['load_after']:.1f}" for r in rows)
                         for n, rows in runs.items()),
             f"- model `{args.model}` (float32), SparseGPT {args.sparsity} (solver {args.solver_dtype}), "
             f"calibration {args.calib} "
             f"{args.nsamples} × {args.seqlen} (batch {args.batch_size}, seeds {args.seeds}), 1 process; perplexity on "
             f"the validation split of {', '.join(args.eval_sources)} ({args.eval_windows} × {args.seqlen})",
             f"- command: `python bench/prune/pass_profile.py {' '.join(a for a in sys.argv[1:])}`",
             "- seconds are means over the runs of each column (alternated, so all saw the same load); '–': that "
             "checkout's pass has no timer for the phase (its time is inside another line); perplexities: mean "
             "(per seed)", "",
             "| phase | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for key, label in PHASES:
        values = [mean([phase(r["phases"], key) for r in runs[n]]) for n in names]
        if all(v in (None, 0.0) for v in values):
            continue
        lines.append(f"| {label} | " + " | ".join("–" if v is None else f"{v:.1f}" for v in values) + " |")
    total = [mean([r["seconds"] for r in runs[n]]) for n in names]
    lines.append("| **pass total** | " + " | ".join(f"**{t:.1f}**" for t in total) + " |")
    per_layer = [mean([sum(r["layer_seconds"]) / len(r["layer_seconds"]) for r in runs[n]]) for n in names]
    lines.append("| per decoder layer | " + " | ".join(f"{t:.2f}" for t in per_layer) + " |")
    for key in ["sparsity", "error_sum", *(f"ppl/{s}" for s in args.eval_sources)]:
        cells = []
        for n in names:
            by_seed = [mean([r[key] for r in runs[n] if r["seed"] == s]) for s in args.seeds]
            shown = key.startswith("ppl/") and len(by_seed) > 1
            spread = f" ({', '.join(f'{v:.4g}' for v in by_seed)})" if shown else ""
            cells.append(f"{mean(by_seed):.4g}{spread}")
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    if len(names) > 1:
        lines += [""] + [f"{n} / {names[0]} pass time: {t / total[0]:.2f}x" for n, t in zip(names[1:], total[1:])]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--calib", default="stdlib-docs")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="calibration seeds, each run per column")
    p.add_argument("--variants", nargs="+", default=["float32"], choices=VARIANTS,
                   help="this checkout's pass settings, a column each: the layer-forward precision "
                        "(PruneConfig.forward_dtype), +ts for true_sequential, +h16 for bfloat16 Hessian products "
                        "(hessian_dtype); the baseline runs float32")
    p.add_argument("--solver-dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    p.add_argument("--eval-sources", nargs="*", default=["stdlib-docs", "debian-licenses"])
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--baseline", help="root of an older checkout to run the same pass with")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--out", type=Path)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)  # the child's
    p.add_argument("--forward-dtype", default="float32", help=argparse.SUPPRESS)  # the child's
    p.add_argument("--true-sequential", action="store_true", help=argparse.SUPPRESS)  # the child's
    p.add_argument("--hessian-dtype", default="float32", help=argparse.SUPPRESS)  # the child's
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    started = datetime.datetime.now(datetime.timezone.utc)
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
    cpu = next((ln.split(":", 1)[1].strip() for ln in lscpu if ln.startswith("Model name")), "?")
    here = str(Path(__file__).resolve().parents[2])
    columns = {f"this checkout ({v})": (here, v) for v in args.variants}
    if args.baseline:
        columns = {"baseline": (args.baseline, "float32"), **columns}
    runs: dict[str, list[dict]] = {name: [] for name in columns}
    for repeat in range(args.repeats):
        for seed in args.seeds:
            for name, (package, dtype) in (columns.items() if repeat % 2 == 0 else reversed(columns.items())):
                runs[name].append(spawn(args, package, seed, dtype))
    text = report(args, started, cpu, runs)
    print(text)
    if args.out:
        args.out.write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
