"""Compare run dirs, or report on one: a metric by target sparsity after pruning and after fine-tuning, as a
markdown table, a CSV and a PNG plot, plus the best run at each sparsity; and the console stage table the
scheduler prints after each stage (`format_stage_table`).

Which value is better is read from the metric's name: lower for `ppl/*` and when its last "/"-part names a
perplexity, a loss or an error rate (contains "ppl", "perplexity", "loss", "bits_per_byte", "bpb" or "error"),
higher otherwise (accuracy, f1, exact_match, ...). A run's value at a sparsity is its fine-tuned one when it
has one, else its pruned one; when a run evaluated the same target twice, the later record counts.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from sparsegpt.core.errors import UserError
from sparsegpt.run.rundir import RunState, read_metrics, read_state

LOWER_IS_BETTER = ("ppl", "perplexity", "loss", "bits_per_byte", "bpb", "error")
PHASE_LABELS = {"pruned": "after prune", "finetuned": "after fine-tune"}


def lower_is_better(metric: str) -> bool:
    """True for perplexity/loss/error-like metric names, False for accuracy-like ones."""
    parts = metric.lower().split("/")
    return parts[0] == "ppl" or any(word in parts[-1] for word in LOWER_IS_BETTER)


def load_runs(run_dirs: list[str | Path]) -> dict[str, list[dict]]:
    """Each run's metrics.jsonl records, labelled by folder name (by the path given when names repeat)."""
    names = [Path(d).name or str(d) for d in run_dirs]
    labels = names if len(set(names)) == len(names) else [str(d) for d in run_dirs]
    if len(set(labels)) != len(labels):
        raise UserError(f"run dirs {[str(d) for d in run_dirs]} repeat; pass each run once")
    return {label: read_metrics(d) for label, d in zip(labels, run_dirs)}


def numeric_metrics(records: list[dict]) -> list[str]:
    """The run's numeric metric names, in order of first appearance."""
    seen: dict[str, None] = {}
    for r in records:
        for key, value in r["metrics"].items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                seen[key] = None
    return list(seen)


def choose_metric(runs: dict[str, list[dict]], metric: str | None = None) -> str:
    """`metric` if every run has it, else (when None) the first ppl/* metric common to all runs."""
    available = {label: numeric_metrics(records) for label, records in runs.items()}
    listing = "; ".join(f"{label}: {', '.join(m) or 'none'}" for label, m in available.items())
    if metric is not None:
        missing = [label for label, m in available.items() if metric not in m]
        if missing:
            raise UserError(f"metric {metric!r} is not in run(s) {', '.join(missing)}; available: {listing}")
        return metric
    common = [m for m in next(iter(available.values())) if all(m in other for other in available.values())]
    ppl = [m for m in common if m.startswith("ppl/")]
    if not ppl:
        raise UserError(f"no ppl/* metric is common to all runs; pass --metric NAME; each run has: {listing}")
    return ppl[0]


def _points(records: list[dict], metric: str) -> dict[tuple, tuple[float, float]]:
    """(target, phase) -> (measured sparsity, value), the later record winning."""
    return {(_key(r["target"]), r["phase"]): (r["sparsity"], r["metrics"][metric])
            for r in records if metric in r["metrics"]}


def _key(target) -> float | str:
    return float(target) if isinstance(target, (int, float)) else str(target)


def _targets(runs: dict[str, list[dict]]) -> list:
    """Every target of every run, ordered by measured sparsity."""
    sparsity: dict = {}
    for records in runs.values():
        for r in records:
            sparsity.setdefault(_key(r["target"]), r["sparsity"])
    return sorted(sparsity, key=lambda t: (sparsity[t], str(t)))


def metric_table(runs: dict[str, list[dict]], metric: str) -> tuple[list[str], list[list]]:
    """(header, rows): one row per target, one column per run × {after prune, after fine-tune}."""
    points = {label: _points(records, metric) for label, records in runs.items()}
    header = ["target"] + [f"{label} {PHASE_LABELS[p]}" for label in runs for p in PHASE_LABELS]
    rows = [[t] + [points[label].get((t, p), (None, None))[1] for label in runs for p in PHASE_LABELS]
            for t in _targets(runs)]
    return header, rows


def best_per_target(runs: dict[str, list[dict]], metric: str) -> dict:
    """target -> (run, phase, value) of the best run there (each run at its fine-tuned value if it has one)."""
    lower = lower_is_better(metric)
    best: dict = {}
    for label, records in runs.items():
        points = _points(records, metric)
        for t in {t for t, _ in points}:
            phase = "finetuned" if (t, "finetuned") in points else "pruned"
            value = points[(t, phase)][1]
            if t not in best or (value < best[t][2] if lower else value > best[t][2]):
                best[t] = (label, phase, value)
    return {t: best[t] for t in _targets(runs) if t in best}


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A GitHub markdown table; numbers with 4 significant digits, '-' for missing."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(format_value(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    """The table as CSV, values unrounded, empty for missing."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows([["" if v is None else v for v in row] for row in rows])


def plot(runs: dict[str, list[dict]], metric: str, path: Path) -> None:
    """metric vs measured sparsity: one colour per run, solid after fine-tuning, dashed after pruning."""
    from matplotlib.figure import Figure  # lazy (heavy, optional); no pyplot: no global figure state, Agg canvas

    fig = Figure(figsize=(8, 5), dpi=100)
    ax = fig.subplots()
    colors = [f"C{i % 10}" for i in range(len(runs))]
    for color, (label, records) in zip(colors, runs.items()):
        points = _points(records, metric)
        for phase, style in (("finetuned", "-"), ("pruned", "--")):
            xy = sorted(xy for (_, p), xy in points.items() if p == phase)
            if xy:
                ax.plot([100 * x for x, _ in xy], [y for _, y in xy], linestyle=style, marker="o", color=color,
                        label=f"{label} ({PHASE_LABELS[phase]})")
    if metric.startswith("ppl/") or "perplexity" in metric:
        ax.set_yscale("log")
    ax.set_title(f"{metric} vs sparsity")
    ax.set_xlabel("sparsity of the pruned linears (%)")
    ax.set_ylabel(metric + (" (lower is better)" if lower_is_better(metric) else " (higher is better)"))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path)


def write_compare(runs: dict[str, list[dict]], metric: str, out_dir: str | Path) -> str:
    """Write compare.md, compare.csv and compare.png into out_dir; returns the markdown."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    header, rows = metric_table(runs, metric)
    better = "lower" if lower_is_better(metric) else "higher"
    best = [f"- {format_value(t)}: **{label}** ({PHASE_LABELS[phase]}, {format_value(v)})"
            for t, (label, phase, v) in best_per_target(runs, metric).items()]
    md = "\n".join([f"# {metric} by target sparsity ({better} is better)", "", markdown_table(header, rows), "",
                    "Best run at each sparsity:", *best, ""])
    (out / "compare.md").write_text(md, encoding="utf-8")
    write_csv(out / "compare.csv", header, rows)
    plot(runs, metric, out / "compare.png")
    return md


def time_table(records: list[dict], state: RunState | None) -> tuple[list[str], list[list]]:
    """Per stage: each evaluated phase's seconds (metrics.jsonl) and, with state.json, each scheduler phase's."""
    phases = []
    stages = state.stages if state is not None else {}
    for entry in stages.values():
        phases += [p for p in entry.seconds if p not in phases and p.value != "complete"]
    header = ["stage", "name", "pruned phase", "finetuned phase"] + [f"state: {p.value}" for p in phases]
    rows = []
    for r in stage_rows(records, None):
        entry = stages.get(r["stage"])
        seconds = entry.seconds if entry is not None else {}
        rows.append([r["stage"], r["name"], r["seconds"].get("pruned"), r["seconds"].get("finetuned"),
                     *(seconds.get(p) for p in phases)])
    return header, rows


def write_report(run_dir: str | Path, out_dir: str | Path | None = None, metric: str | None = None) -> str:
    """Write report.md, report.csv and report.png for one run (default: into the run dir); returns the markdown."""
    records = read_metrics(run_dir)
    label = Path(run_dir).name or str(run_dir)
    metric = choose_metric({label: records}, metric)
    out = Path(out_dir or run_dir)
    out.mkdir(parents=True, exist_ok=True)
    header = ["stage", "name", "target", "sparsity pruned", "sparsity finetuned",
              f"{metric} {PHASE_LABELS['pruned']}", f"{metric} {PHASE_LABELS['finetuned']}"]
    rows = [[r["stage"], r["name"], r["target"], r["sparsity"].get("pruned"), r["sparsity"].get("finetuned"),
             r["metric"].get("pruned"), r["metric"].get("finetuned")] for r in stage_rows(records, metric)]
    t_header, t_rows = time_table(records, read_state(run_dir))
    parts = [f"# Run {label}", "", "## Stages", "", markdown_table(header, rows), "",
             "## Time (seconds)", "", markdown_table(t_header, t_rows), ""]
    errors = [f"- stage {r['stage']} {r['phase']}: {hook}: {msg}"
              for r in records for hook, msg in r.get("errors", {}).items()]
    if errors:
        parts += ["## Failed evaluation hooks", "", *errors, ""]
    md = "\n".join(parts)
    (out / "report.md").write_text(md, encoding="utf-8")
    write_csv(out / "report.csv", header, rows)
    plot({label: records}, metric, out / "report.png")
    return md


def first_ppl_metric(records: list[dict]) -> str | None:
    """The first `ppl/*` metric key in the records, or None."""
    return next((k for r in records for k in r.get("metrics", {}) if k.startswith("ppl/")), None)


def format_value(value: Any) -> str:
    """A compact cell: 4 significant digits for numbers, '-' for missing."""
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, (int, float)) else str(value)


def stage_rows(records: list[dict], metric: str | None) -> list[dict]:
    """One row per stage: stage, name, target, and per phase: `metric`, measured sparsity, seconds."""
    rows: dict[int, dict] = {}
    for r in records:
        row = rows.setdefault(r["stage"], {"stage": r["stage"], "name": r["name"], "target": r["target"],
                                           "metric": {}, "sparsity": {}, "seconds": {}})
        row["metric"][r["phase"]] = r["metrics"].get(metric) if metric else None
        row["sparsity"][r["phase"]] = r["sparsity"]
        row["seconds"][r["phase"]] = r.get("seconds")
    return [rows[k] for k in sorted(rows)]


def format_stage_table(records: list[dict], metric: str | None = None) -> str:
    """A console table of a run: stage, name, target, measured sparsity, `metric` (default: the first ppl/*)
    after pruning and after fine-tuning, seconds of both phases."""
    metric = metric or first_ppl_metric(records)
    label = metric or "metric"
    header = ["stage", "name", "target", "sparsity", f"{label} pruned", f"{label} finetuned", "seconds"]
    body = []
    for r in stage_rows(records, metric):
        sparsity = r["sparsity"].get("finetuned", r["sparsity"].get("pruned"))
        seconds = [s for s in r["seconds"].values() if s is not None]
        body.append([str(r["stage"]), str(r["name"]), format_value(r["target"]), f"{sparsity:.4f}",
                     format_value(r["metric"].get("pruned")), format_value(r["metric"].get("finetuned")),
                     f"{sum(seconds):.1f}" if seconds else "-"])
    widths = [max(len(row[c]) for row in [header, *body]) for c in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *body])


def flatten_for_trackers(record: dict) -> dict[str, float]:
    """Numeric values of a record for accelerate trackers: "<phase>/<metric>", "<phase>/sparsity", ..."""
    phase = record["phase"]
    flat = {f"{phase}/sparsity": float(record["sparsity"])}
    if isinstance(record.get("target"), (int, float)):
        flat["target"] = float(record["target"])
    if record.get("seconds") is not None:
        flat[f"{phase}/seconds"] = float(record["seconds"])
    for key, value in record["metrics"].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[f"{phase}/{key}"] = float(value)
    return flat
