"""The one registry of evaluation hooks: each hook type's options and the function that runs it.

A hook is a dict with a `type` and its options (see `HOOKS`). Runners are named here ("module:function"),
not imported, so recipe validation stays free of torch and transformers; `runner(kind)` resolves them the same
way a `custom` hook's `path` is resolved. A runner is called as `fn(model, tokenizer, hook, context) -> dict`.

Ranks (`HookType.ranks`), when `evaluation.run_hooks` is called on every rank of a multi-process job: "main" hooks
run on rank 0 alone and the others receive their outcome (samples, sparsity, lm-eval, custom hooks: a custom hook
is a main-process function and must not use collectives); "all" hooks run on every rank and split their work over
the ranks (perplexity). An "all" runner returns `(metrics, shares)`, shares = the work each rank did, in rank
order, and must reach its collectives on every rank or fail on every rank (see `world.on_every_rank`).

To add a hook type: one `HookType` entry below and its runner function (built-in ones live in
`sparsegpt/evaluate/runners.py`, named `run_<type>_hook`).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from sparsegpt.core.errors import UserError


@dataclass(frozen=True)
class HookType:
    """Options of one hook type; `recipe_fills` are required keys a recipe may omit (it fills them in); `ranks`
    says where it runs in a multi-process job: "main" (rank 0, outcome broadcast) or "all" (distributed)."""

    required: frozenset[str]
    optional: frozenset[str]
    runner: str
    recipe_fills: frozenset[str] = frozenset()
    ranks: str = "main"


HOOKS: dict[str, HookType] = {
    "perplexity": HookType(frozenset({"source"}), frozenset({"seqlen", "max_windows", "layerwise", "batch_size",
                                                             "split"}),
                           "sparsegpt.evaluate.runners:run_perplexity_hook", recipe_fills=frozenset({"source"}),
                           ranks="all"),
    "lm_eval": HookType(frozenset({"tasks"}), frozenset({"num_fewshot", "limit", "include_path", "batch_size"}),
                        "sparsegpt.evaluate.runners:run_lm_eval_hook"),
    "sparsity": HookType(frozenset(), frozenset(), "sparsegpt.evaluate.runners:run_sparsity_hook"),
    "samples": HookType(frozenset({"prompts"}), frozenset({"max_new_tokens"}),
                        "sparsegpt.evaluate.runners:run_samples_hook"),
    "custom": HookType(frozenset({"path"}), frozenset({"args", "name"}), "sparsegpt.evaluate.runners:run_custom_hook"),
}


@dataclass
class HookContext:
    """What a hook may want to know about the evaluation it runs in."""

    stage: int = 0
    name: str = ""
    phase: str = ""
    target: Any = None
    run_dir: str | None = None
    device: str | None = None
    masks: Any = None  # sparsegpt.core.masks.MaskSet | None


def resolve_callable(path: str) -> Callable:
    """The function named by 'package.module:function' (UserError naming what cannot be found)."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise UserError(f"custom hook path {path!r} must look like 'package.module:function'")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(f"custom hook {path!r}: cannot import module {module_name!r} ({e}); "
                        "make it importable (installed or on PYTHONPATH)") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UserError(f"custom hook {path!r}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UserError(f"custom hook {path!r} is not callable; point it at a function")
    return obj


def runner(hook: dict) -> Callable:
    """The function that runs this hook: the registry's runner for its type."""
    return resolve_callable(HOOKS[hook["type"]].runner)


def require_lm_eval() -> None:
    """UserError unless the optional lm-eval package is installed."""
    if importlib.util.find_spec("lm_eval") is None:
        raise UserError("lm-eval tasks need the lm-eval package: pip install 'sparsegpt[eval]'")


def source_label(source: str) -> str:
    """A data source's name in metric keys: file sources by their stem."""
    return Path(source).stem if source.endswith((".txt", ".jsonl")) or os.sep in source else source


def split_suffix(hook: dict) -> str:
    """How a perplexity hook names its split: nothing for the test split, "@tune" (etc.) for another one, so two
    hooks on one source ("ppl/stdlib-docs", "ppl/stdlib-docs@tune") never share a name."""
    split = hook.get("split", "test")
    return "" if split == "test" else f"@{split}"


def hook_name(hook: dict) -> str:
    """The hook's label in `errors` and the prefix of its metric keys."""
    kind = hook["type"]
    if kind == "perplexity":
        return f"ppl/{source_label(str(hook['source']))}{split_suffix(hook)}"
    if kind == "lm_eval":
        return "lm_eval/" + "+".join(hook["tasks"])
    if kind == "custom":
        return hook.get("name") or hook["path"].rpartition(":")[2].rpartition(".")[2]
    return kind


def validate_hooks(hooks: list[dict]) -> None:
    """Check hook configs before any work starts: known types and keys, importable custom hooks, lm-eval present."""
    seen = set()
    for i, hook in enumerate(hooks):
        if not isinstance(hook, dict) or hook.get("type") not in HOOKS:
            got = hook.get("type") if isinstance(hook, dict) else type(hook).__name__
            raise UserError(f"eval hook #{i}: type {got!r} is unknown; use one of {', '.join(HOOKS)}")
        spec = HOOKS[hook["type"]]
        keys = set(hook) - {"type"}
        if spec.required - keys or keys - spec.required - spec.optional:
            raise UserError(f"eval hook #{i} ({hook['type']}): keys {sorted(keys)} are wrong; required "
                            f"{sorted(spec.required)}, optional {sorted(spec.optional)}")
        for key in ("tasks", "prompts"):
            value = hook.get(key)
            if key in hook and not (value and isinstance(value, list) and all(isinstance(v, str) for v in value)):
                raise UserError(f"eval hook #{i} ({hook['type']}): {key} must be a non-empty list of strings")
        if hook["type"] == "lm_eval":
            require_lm_eval()
        if hook["type"] == "custom":
            resolve_callable(hook["path"])
            if not isinstance(hook.get("args", {}), dict):
                raise UserError(f"eval hook #{i} (custom): args must be a mapping of keyword arguments")
        name = hook_name(hook)
        if name in seen:
            raise UserError(f"eval hook #{i}: a second hook named {name!r}; give custom hooks distinct 'name's "
                            "and list each source/task once")
        seen.add(name)
