"""Regenerate the `# Memory` block of each shipped large recipe's header from `sparsegpt.run.memory` and check that the
estimate fits the hardware the header names (`# Hardware: Nx GPU-XXGB ..., >= YYY GB CPU RAM`).

    python bench/memory/recipe_headers.py           # print each recipe's block and whether it fits
    python bench/memory/recipe_headers.py --write   # rewrite the blocks in place

The models' configs are their published config.json files (tests/data/published_configs.json: no hub access
needed); the world size is the `--num_processes N` of the header's command. tests/test_memory.py runs `check`.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from transformers import AutoConfig

from sparsegpt.config.recipe import load_recipe
from sparsegpt.run.memory import GIB, estimate, header_lines

REPO = Path(__file__).resolve().parents[2]
CONFIGS = json.loads((REPO / "tests" / "data" / "published_configs.json").read_text())
HARDWARE = re.compile(r"# Hardware: (\d+)x \S+?-(\d+)GB.*?>= (\d+) GB CPU RAM", re.S)


def recipes() -> list[Path]:
    """The shipped recipes whose model has a published config here (the large ones)."""
    return [p for p in sorted((REPO / "recipes").glob("*.yaml")) if load_recipe(p).model in CONFIGS]


def block(path: Path) -> tuple[list[str], dict]:
    """(the header's memory lines, {world, gpus, gpu_gib, host_gib, device_gib, cpu_gib, fits}) for a recipe."""
    text = path.read_text()
    recipe = load_recipe(path)
    world = int(re.search(r"--num_processes (\d+)", text).group(1))
    gpus, gpu_gb, host_gb = (int(x) for x in HARDWARE.search(text).groups())
    e = estimate(AutoConfig.for_model(**CONFIGS[recipe.model]), recipe, world)
    steps = [s for s in (e["prune"], e["finetune"], e["evaluate"]) if s is not None]
    device, cpu = max(s["device"] for s in steps), max(s["cpu"] for s in steps)
    ranks_per_node = min(world, gpus)
    host_gib = host_gb * 1e9 / GIB
    facts = {"world": world, "gpus": gpus, "gpu_gib": gpu_gb, "host_gib": round(host_gib, 1), "device_gib": device,
             "cpu_gib_per_node": cpu * ranks_per_node,
             "fits": device <= 0.95 * gpu_gb and cpu * ranks_per_node <= 0.9 * host_gib}
    return header_lines(e), facts


def rewrite(path: Path, lines: list[str]) -> None:
    """Replace the header's `# Memory` block (up to the next `# Time` line) with `lines`."""
    text = path.read_text()
    start = text.index("# Memory")
    end = text.index("# Time", start)
    path.write_text(text[:start] + "\n".join(lines) + "\n" + text[end:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help="rewrite the recipes' memory blocks")
    args = parser.parse_args()
    for path in recipes():
        lines, facts = block(path)
        print(f"{path.relative_to(REPO)}: {json.dumps(facts)}")
        print("\n".join(lines))
        if args.write:
            rewrite(path, lines)


if __name__ == "__main__":
    main()
