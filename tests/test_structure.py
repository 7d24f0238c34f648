"""The code's structure rules (docs/ARCHITECTURE.md "Import policy" and "Config shapes"), checked on the source:
imports at module top except the heavy optional packages, light modules that stay light, one config shape per
concern, the scheduler's phase table, short modules."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from sparsegpt.commands import prune as prune_command
from sparsegpt.config.recipe import FinetuneSettings, KDSettings, LoraSection, PruneSettings
from sparsegpt.config.settings import ReconstructSettings
from sparsegpt.heal.config import FinetuneConfig
from sparsegpt.heal.distill import KDConfig
from sparsegpt.heal.lora import LoraSettings
from sparsegpt.prune.reconstruct import ReconstructConfig
from sparsegpt.prune.sequential import PruneConfig
from sparsegpt.run.rundir import Phase
from sparsegpt.run.scheduler import PIPELINE

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "sparsegpt"
LAZY = {"deepspeed", "peft", "lm_eval", "matplotlib", "datasets"}  # the documented lazy set
MAX_LINES = 420


def _function_local_imports(path: Path) -> list[tuple[int, str]]:
    """(line, top-level package) of every import statement inside a function body."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for inner in ast.walk(node):
                if isinstance(inner, ast.Import):
                    found += [(inner.lineno, alias.name.split(".")[0]) for alias in inner.names]
                elif isinstance(inner, ast.ImportFrom):
                    found.append((inner.lineno, "." if inner.level else (inner.module or "").split(".")[0]))
    return found


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_only_heavy_optional_packages_are_imported_lazily(path):
    bad = [(line, pkg) for line, pkg in _function_local_imports(path) if pkg not in LAZY]
    assert not bad, f"{path.relative_to(ROOT)}: function-local imports outside {sorted(LAZY)} at {bad}"


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_modules_stay_short(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(ROOT)} has {lines} lines; split it by concern"


# -- the layering (docs/ARCHITECTURE.md "Layout"): a subpackage imports only its own and lower ones ------------
LAYERS = ("core", "config", "storage", "prune", "heal", "evaluate", "run", "commands")
TOP = {"sparsegpt", "sparsegpt.cli"}  # the package's public names and the console script stand above every layer


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _first_party_imports(path: Path) -> set[str]:
    """Every sparsegpt module `path` imports, at any depth of its code (TYPE_CHECKING blocks included)."""
    modules = {_module_name(p) for p in PACKAGE.rglob("*.py")}
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("sparsegpt")}
        elif isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").startswith("sparsegpt"):
            found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                      for a in node.names}
    return found


def _layer(module: str) -> int:
    if module in TOP:
        return len(LAYERS)
    return LAYERS.index(module.split(".")[1])


def test_every_module_lives_in_a_layer():
    loose = [m for m in map(_module_name, PACKAGE.rglob("*.py")) if m not in TOP and m.split(".")[1] not in LAYERS]
    assert not loose, f"modules outside the layers {LAYERS}: {loose}; put each in the subpackage of its concern"


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_imports_a_higher_layer(path):
    here = _module_name(path)
    upward = sorted(m for m in _first_party_imports(path) if m != "sparsegpt" and _layer(m) > _layer(here))
    assert not upward, f"{here} (layer {LAYERS[_layer(here)] if here not in TOP else 'top'}) imports {upward}"


def test_the_import_graph_has_no_cycle():
    graph = {_module_name(p): _first_party_imports(p) - {"sparsegpt"} for p in PACKAGE.rglob("*.py")}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path + [node, nxt]
            if nxt not in state and (cycle := visit(nxt, path + [node])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [])):
            pytest.fail("import cycle: " + " -> ".join(cycle[cycle.index(cycle[-1]):]))


def _imported_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted(m.split('.')[0] for m in sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_recipe_and_hook_registry_import_neither_torch_nor_transformers():
    loaded = _imported_after("import sparsegpt.config.recipe, sparsegpt.config.hooks")
    assert not loaded & {"torch", "transformers", "accelerate"}, loaded & {"torch", "transformers", "accelerate"}


def test_cli_help_imports_no_command_module():
    loaded = _imported_after("from sparsegpt.cli import build_parser; build_parser('')")
    assert "torch" not in loaded and "transformers" not in loaded


# -- one config shape per concern: the recipe's pydantic models are the source ---------------------------------
# Fields a library config has that the recipe deliberately does not hold, and why:
NOT_IN_RECIPE = {
    PruneConfig: {"sparsity", "prune_n", "prune_m"},            # from the stage's target
    FinetuneConfig: {"seed", "micro_batch_size", "grad_accum",   # recipe seed + stage index; distributed section
                     "mask_enforcement",                         # partial enforcement: benchmarks and tests only
                     "checkpoint_final"},                        # the scheduler saves the model right after
    KDConfig: set(), LoraSettings: set(), ReconstructConfig: set(),
}
# Recipe fields that are not the library config's, and why:
NOT_IN_CONFIG = {
    PruneSettings: {"nsamples", "seqlen",                        # size the calibration data (an argument)
                    "stream"},                                   # how the scheduler holds the model (streaming)
    FinetuneSettings: {"tokens", "warmup_ratio", "seqlen",      # become steps / warmup_steps / the data's shape
                       "lr_search"},                             # how the scheduler resolves lr: auto to a float
    KDSettings: {"teacher"},                                     # which model is loaded as the teacher
    LoraSection: set(), ReconstructSettings: set(),
}
PAIRS = [(PruneSettings, PruneConfig), (FinetuneSettings, FinetuneConfig), (KDSettings, KDConfig),
         (LoraSection, LoraSettings), (ReconstructSettings, ReconstructConfig)]


@pytest.mark.parametrize("settings, config", PAIRS, ids=lambda c: c.__name__)
def test_recipe_settings_and_library_configs_have_the_same_fields(settings, config):
    recipe_fields = set(settings.model_fields)
    config_fields = {f.name for f in dataclasses.fields(config)}
    assert config_fields - recipe_fields == NOT_IN_RECIPE[config], "a library knob the recipe cannot set"
    assert recipe_fields - config_fields == NOT_IN_CONFIG[settings], "a recipe knob the library does not take"


# Defaults that differ on purpose: a recipe's warmup_steps None means "unset" (exclusive with warmup_ratio); a
# recipe's `kd:` section means logit distillation unless it says otherwise.
DIFFERENT_DEFAULTS = {"warmup_steps", "logit_weight"}


@pytest.mark.parametrize("settings, config", PAIRS, ids=lambda c: c.__name__)
def test_shared_fields_have_the_same_defaults(settings, config):
    defaults = {f.name: f.default for f in dataclasses.fields(config) if f.default is not dataclasses.MISSING}
    for name, field in settings.model_fields.items():
        if name in defaults and not field.is_required() and name not in DIFFERENT_DEFAULTS | {"kd", "lora"}:
            assert field.get_default(call_default_factory=True) == defaults[name], name


def test_the_pipeline_is_every_phase_once_in_order():
    assert [spec.phase for spec in PIPELINE] == list(Phase)
    assert all(spec.ranks in ("main", "all") for spec in PIPELINE)


# The CLI's flag for each PruneConfig field (the recipe's PruneSettings has the same names; see above).
PRUNE_FLAGS = {"sparsity": "sparsity", "prune_n": "nm", "prune_m": "nm", "shared_hessian": "per_linear_hessian",
               "dtype": "solver_dtype"}


def test_every_prune_knob_has_a_cli_flag():
    parser = argparse.ArgumentParser()
    prune_command.add_arguments(parser)
    dests = {action.dest for action in parser._actions}
    missing = [f.name for f in dataclasses.fields(PruneConfig) if PRUNE_FLAGS.get(f.name, f.name) not in dests]
    assert not missing, f"PruneConfig fields without a `sparsegpt prune` flag: {missing}"
