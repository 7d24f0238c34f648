"""The regime study's report: table, verdicts and plots from the finished runs of `bench/regime/regime.py`.

    python bench/regime/regime.py --out runs/regime --report      # what calls this

Per (recipe, budget): perplexity after the stage at 80 % and at 90 % on both domains (mean over the seeds that
ran; with two seeds also their spread, max - min), ×dense at 90 %, and the run's minutes. Recipe (a), one-shot
90 % without healing, is the 'pruned' evaluation of the one-shot-heal runs (the same model before its fine-tune).
A recipe is called the winner of a budget only when it beats the runner-up by more than the largest seed spread
measured at that budget; otherwise the verdict says the two are within noise.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from sparsegpt.run.rundir import read_metrics, read_state  # noqa: E402

DOMAINS = {"stdlib-docs": "ppl/stdlib-docs", "debian-licenses": "ppl/debian-licenses"}
TUNE = ("stdlib-docs tune", "ppl/stdlib-docs@tune")  # the tuned study's column the lr was chosen on
ONESHOT = "oneshot"
# recipe (a)-like rows: a single-stage recipe's model before its fine-tune, as a 0-token row
PRUNED_ROWS = {"oneshot-heal": "oneshot", "recon-heal": "recon", "recon-heal80": "recon80"}
OLD_RESULTS = Path(__file__).with_name("results_regime.json")  # the 2026-12-01 study (lr 1e-4, no reconstruction)


def parse_name(name: str) -> tuple[str, int, int]:
    """'prog4-kd-64k-s0' -> ('prog4-kd', 65536, 0)."""
    recipe, budget, seed = name.rsplit("-", 2)
    return recipe, int(budget.rstrip("k")) * 1024, int(seed.lstrip("s"))


def run_points(run_dir: Path) -> dict:
    """{(target, phase): {domain: ppl}} of one run, plus its seconds (None while unfinished)."""
    points: dict = {}
    keys = {**DOMAINS, TUNE[0]: TUNE[1]}
    for r in read_metrics(run_dir):
        points[(round(float(r["target"]), 4), r["phase"])] = {d: r["metrics"].get(k) for d, k in keys.items()}
    state = read_state(run_dir)
    seconds = None
    if state is not None and state.stages:
        seconds = sum(sum(v for v in entry.seconds.values()) for entry in state.stages.values())
    return {"points": points, "seconds": seconds}


def collect(out: Path, names: list[str], folders: dict[str, str] | None = None) -> dict:
    """{(recipe, budget): {seed: run_points}} for every planned run with metrics (recipe (a) derived); `folders`
    maps a run name to the run dir that holds it where they differ."""
    table: dict = {}
    for name in names:
        run_dir = out / "runs" / (folders or {}).get(name, name)
        if not (run_dir / "metrics.jsonl").is_file():
            continue
        recipe, budget, seed = parse_name(name)
        data = run_points(run_dir)
        final = 0.8 if recipe.endswith("80") else 0.9
        if not any(phase == "finetuned" and target == final for target, phase in data["points"]):
            continue  # unfinished: no final result yet
        table.setdefault((recipe, budget), {})[seed] = data
        if recipe in PRUNED_ROWS and (final, "pruned") in data["points"]:
            one = {"points": {(final, "finetuned"): data["points"][(final, "pruned")]}, "seconds": None}
            table.setdefault((PRUNED_ROWS[recipe], 0), {})[seed] = one
    return table


def _value(seeds: dict, target: float, domain: str) -> tuple[float | None, float | None, int]:
    values = [s["points"].get((target, "finetuned"), {}).get(domain) for s in seeds.values()]
    values = [v for v in values if v is not None]
    if not values:
        return None, None, 0
    return statistics.fmean(values), (max(values) - min(values)) if len(values) > 1 else None, len(values)


def rows(table: dict, dense: dict, domains: tuple[str, ...] = tuple(DOMAINS)) -> list[dict]:
    out = []
    for (recipe, budget), seeds in sorted(table.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        row = {"recipe": recipe, "budget": budget, "seeds": sorted(seeds)}
        for domain in domains:
            for target in (0.8, 0.9):
                mean, spread, _ = _value(seeds, target, domain)
                row[f"{domain}@{round(target * 100)}"] = mean
                row[f"{domain}@{round(target * 100)} spread"] = spread
        row["x dense @90"] = (row["stdlib-docs@90"] / dense["stdlib-docs"]) if row["stdlib-docs@90"] else None
        minutes = [s["seconds"] / 60 for s in seeds.values() if s["seconds"] is not None]
        row["minutes"] = statistics.fmean(minutes) if minutes else None
        out.append(row)
    return out


def _cell(mean, spread=None) -> str:
    if mean is None:
        return "-"
    return f"{mean:.1f}" + (f" ±{spread / 2:.1f}" if spread is not None else "")


def verdicts(table_rows: list[dict]) -> list[str]:
    """Per budget > 0: the best recipe at 90 % on stdlib-docs, and whether its lead exceeds the seed spread."""
    lines = []
    for budget in sorted({r["budget"] for r in table_rows if r["budget"]}):
        here = sorted((r for r in table_rows if r["budget"] == budget and r["stdlib-docs@90"] is not None),
                      key=lambda r: r["stdlib-docs@90"])
        spreads = [r[f"{d}@90 spread"] for r in table_rows for d in DOMAINS
                   if r["budget"] == budget and r[f"{d}@90 spread"] is not None]
        noise = max(spreads) if spreads else None
        if len(here) < 2:
            continue
        best, second = here[0], here[1]
        lead = second["stdlib-docs@90"] - best["stdlib-docs@90"]
        held_out = best["debian-licenses@90"] is not None and all(
            best["debian-licenses@90"] <= r["debian-licenses@90"] for r in here if r["debian-licenses@90"] is not None)
        if noise is None:
            call = "no second seed at this budget, so no spread to compare the lead with"
        elif lead > noise:
            call = f"a lead larger than the largest seed spread here ({noise:.1f}): the winner"
        else:
            call = f"within the largest seed spread here ({noise:.1f}): no winner called"
        lines.append(f"- {budget // 1024}k tokens: best at 90 % on stdlib-docs is **{best['recipe']}** "
                     f"({best['stdlib-docs@90']:.1f}), {lead:.1f} ahead of {second['recipe']} — {call}; "
                     f"on the held-out debian-licenses it is {'also' if held_out else 'not'} the best "
                     f"({_cell(best['debian-licenses@90'])}).")
    return lines


def markdown(table_rows: list[dict], dense: dict) -> str:
    header = ["recipe", "budget (tokens)", "seeds", "stdlib @80 %", "stdlib @90 %", "×dense @90 %",
              "licenses @80 %", "licenses @90 %", "minutes / run"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
             f"| dense | - | - | {dense['stdlib-docs']:.2f} | {dense['stdlib-docs']:.2f} | 1.0 | "
             f"{dense['debian-licenses']:.2f} | {dense['debian-licenses']:.2f} | - |"]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in table_rows]
    return "\n".join(lines + ["", *verdicts(table_rows)])


def _cells(r: dict, extra: tuple[str, ...] = ()) -> list[str]:
    """A table row's cells: recipe, budget, seeds, both domains at 80 / 90 % (×dense at 90), each `extra` domain
    at 90 %, minutes."""
    return [r["recipe"], f"{r['budget']:,}", ",".join(map(str, r["seeds"])),
            _cell(r["stdlib-docs@80"], r["stdlib-docs@80 spread"]),
            _cell(r["stdlib-docs@90"], r["stdlib-docs@90 spread"]),
            f"{r['x dense @90']:.1f}" if r["x dense @90"] else "-",
            _cell(r["debian-licenses@80"], r["debian-licenses@80 spread"]),
            _cell(r["debian-licenses@90"], r["debian-licenses@90 spread"]),
            *(_cell(r.get(f"{d}@90"), r.get(f"{d}@90 spread")) for d in extra),
            f"{r['minutes']:.1f}" if r["minutes"] else "-"]


def plot_sparsity(table: dict, dense: dict, path: Path) -> None:
    """Perplexity (log) after each stage's fine-tune vs sparsity, one line per recipe, one panel per budget."""
    budgets = sorted({b for _, b in table if b})
    fig, axes = plt.subplots(1, len(budgets), figsize=(6 * len(budgets), 4.5), squeeze=False)
    for ax, budget in zip(axes[0], budgets):
        for (recipe, b), seeds in sorted(table.items()):
            if b != budget:
                continue
            targets = sorted({t for s in seeds.values() for t, p in s["points"] if p == "finetuned"})
            values = [_value(seeds, t, "stdlib-docs")[0] for t in targets]
            ax.plot([0.0] + targets, [dense["stdlib-docs"]] + values, marker="o", label=recipe)
        ax.set_title(f"budget {budget // 1024}k tokens")
        _finish(ax, "sparsity", "stdlib-docs perplexity (after each stage's fine-tune)")
    _save(fig, path)


def plot_tokens(table: dict, dense: dict, path: Path) -> None:
    """Perplexity at 90 % vs fine-tuning tokens (0 = one-shot), one line per recipe, one panel per domain."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    recipes = sorted({r for r, b in table if b})
    for ax, domain in zip(axes, DOMAINS):
        zero = _value(table.get((ONESHOT, 0), {}), 0.9, domain)[0]
        for recipe in recipes:
            xs, ys = ([1024], [zero]) if zero is not None else ([], [])
            for (r, b), seeds in sorted(table.items(), key=lambda kv: kv[0][1]):
                mean = _value(seeds, 0.9, domain)[0] if r == recipe else None
                if mean is not None:
                    xs.append(b)
                    ys.append(mean)
            ax.plot(xs, ys, marker="o", label=recipe)
        ax.axhline(dense[domain], color="black", linestyle="--", linewidth=1, label="dense")
        ax.set_xscale("log", base=2)
        _finish(ax, "fine-tuning tokens (1k point = one-shot, no tokens)", f"{domain} perplexity at 90 %")
    _save(fig, path)


def _finish(ax, xlabel: str, ylabel: str) -> None:
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(out: Path, dense_json: dict, names: list[str]) -> str:
    """Write OUT/regime.{md,json} and the two plots; returns the markdown."""
    dense = {d: dense_json["metrics"][k] if "metrics" in dense_json else dense_json[k] for d, k in DOMAINS.items()}
    table = collect(out, names)
    table_rows = rows(table, dense)
    md = markdown(table_rows, dense)
    (out / "regime.md").write_text(md + "\n", encoding="utf-8")
    (out / "regime.json").write_text(json.dumps({"dense": dense, "rows": table_rows}, indent=1) + "\n")
    if table_rows:
        plot_sparsity(table, dense, out / "regime_sparsity.png")
        plot_tokens(table, dense, out / "regime_tokens.png")
    return md


# -- the tuned study (`regime.py --study tuned`) ------------------------------------------------------------------

def lr_rows(out: Path, lrs: tuple[str, ...], name) -> list[str]:
    """The lr choice: tune-split perplexity (what chose) beside the evaluation windows (never read to choose)."""
    lines = ["| lr | stdlib-docs tune (chooses) | stdlib-docs @90 % | debian-licenses @90 % |", "|---|---|---|---|"]
    for lr in lrs:
        run_dir = out / "runs" / name(lr)
        if not (run_dir / "metrics.jsonl").is_file():
            continue
        p = run_points(run_dir)["points"].get((0.9, "finetuned"))
        if p:
            lines.append(f"| {lr} | {p[TUNE[0]]:.1f} | {p['stdlib-docs']:.1f} | {p['debian-licenses']:.1f} |")
    return lines


def tuned_markdown(new: list[dict], old: list[dict], dense: dict, lr: float | None) -> str:
    header = ["study", "recipe", "budget (tokens)", "seeds", "stdlib @80 %", "stdlib @90 %", "×dense @90 %",
              "licenses @80 %", "licenses @90 %", "tune @90 %", "minutes / run"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
             f"| - | dense | - | - | {dense['stdlib-docs']:.2f} | {dense['stdlib-docs']:.2f} | 1.0 | "
             f"{dense['debian-licenses']:.2f} | {dense['debian-licenses']:.2f} | - | - |"]
    tagged = [("tuned", r) for r in new] + [("12-01", r) for r in old if r["budget"] in (0, 16384, 65536)]
    for study, r in sorted(tagged, key=lambda t: (t[1]["budget"], t[1]["recipe"], t[0] != "12-01")):
        lines.append("| " + " | ".join([study, *_cells(r, (TUNE[0],))]) + " |")
    lr_text = f"lr {lr:g}, chosen on the tune split" if lr else "lr not chosen yet"
    return "\n".join([f"Tuned rows: {lr_text}; 12-01 rows: lr 1e-4, no reconstruction.", "", *lines, "",
                      *levers(new, old)])


# (lever, from (study, recipe), to (study, recipe)): the ratio of their perplexities at the same budget
LEVERS = [("lr (1e-4 -> chosen)", ("12-01", "oneshot-heal"), ("tuned", "oneshot-heal")),
          ("reconstruction before healing", ("tuned", "oneshot-heal"), ("tuned", "recon-heal")),
          ("reconstruction, no healing", ("tuned", "oneshot"), ("tuned", "recon")),
          ("schedule (4 steps, no reconstruction)", ("tuned", "oneshot-heal"), ("tuned", "prog4")),
          ("schedule (4 steps, with reconstruction)", ("tuned", "recon-heal"), ("tuned", "prog4-recon")),
          ("logit KD (progressive)", ("tuned", "prog4"), ("tuned", "prog4-kd")),
          ("SquareHead (progressive)", ("tuned", "prog4"), ("tuned", "prog4-sqhead")),
          ("logit KD (after reconstruction)", ("tuned", "recon-heal"), ("tuned", "recon-heal-kd"))]


def levers(new: list[dict], old: list[dict]) -> list[str]:
    """What each lever bought: before / after at 90 % on both domains, per budget (< 1: the lever helped)."""
    index = {(s, r["recipe"], r["budget"]): r for s, rs in (("tuned", new), ("12-01", old)) for r in rs}
    lines = ["| lever | budget | stdlib @90 % before -> after (ratio) | licenses @90 % before -> after (ratio) |",
             "|---|---|---|---|"]
    for lever, a, b in LEVERS:
        for budget in (0, 16384, 65536):
            ra, rb = index.get((*a, budget)), index.get((*b, budget))
            if not ra or not rb:
                continue
            cells = []
            for d in DOMAINS:
                x, y = ra[f"{d}@90"], rb[f"{d}@90"]
                cells.append(f"{x:.1f} -> {y:.1f} ({y / x:.2f}x)" if x and y else "-")
            lines.append(f"| {lever} | {budget:,} | {cells[0]} | {cells[1]} |")
    return lines


def write_tuned_report(out: Path, dense_json: dict, lr: float | None, names: list[str],
                       lr_runs: dict[str, str], folders: dict[str, str] | None = None) -> str:
    """OUT/regime.{md,json}: the lr rows ({lr: run name}), the tuned rows (`names`, their dirs per `folders`)
    beside the 2026-12-01 rows, the levers."""
    dense = {d: dense_json["metrics"][k] if "metrics" in dense_json else dense_json[k] for d, k in DOMAINS.items()}
    new = rows(collect(out, names, folders), dense, (*DOMAINS, TUNE[0]))
    old = json.loads(OLD_RESULTS.read_text())["rows"]
    md = "\n".join(["lr choice (recon-heal, 16 k tokens, seed 0):", "", *lr_rows(out, tuple(lr_runs), lr_runs.get),
                    "", tuned_markdown(new, old, dense, lr)])
    (out / "regime.md").write_text(md + "\n", encoding="utf-8")
    (out / "regime.json").write_text(json.dumps({"dense": dense, "lr": lr, "rows": new}, indent=1) + "\n")
    return md
