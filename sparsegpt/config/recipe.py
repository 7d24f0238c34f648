"""Recipe schema: one YAML file describes a whole progressive run (model, data, ZeRO settings, stages).

    name: demo
    model: smollm2-135m                      # hub name, local dir, .gguf file, or the alias smollm2-135m
    data: {calibration: stdlib-docs}         # finetune defaults to calibration, eval to [calibration]
    defaults:
      prune: {nsamples: 16, seqlen: 128}
      finetune: {steps: 24, lr: 1.0e-4}      # or tokens: N (converted to steps per world size)
    stages:
      - {name: s50, target: 0.5}
      - {name: s90, target: 0.9, finetune: {steps: 48, kd: {teacher: dense}}}
      - {name: nm, target: "2:4", finetune: false}     # finetune false (or steps 0) = one-shot only
    # instead of stages: schedule: {from: 0.5, to: 0.9, stages: 5, curve: cubic}
    # instead of per-stage steps/tokens: budget: {tokens: 65536, weights: [1, 1, 1, 3]}  (split over the stages)

`load_recipe(path)` validates; every error names its field path and what would be valid.
`Recipe.resolved_stages()` gives each stage its fully merged settings (defaults <- stage overrides, deep-merged;
lists such as eval hooks are replaced, not merged). A target of 0 means dense fine-tuning only.
Eval hooks default to one perplexity hook per `data.eval` source plus a sparsity report; a perplexity hook
without `source` stands for one per `data.eval` source, and a `source` must be listed in `data.eval`.
YAML is read with the YAML 1.2 rules for plain scalars: `2:4` is a string (not base-60 124), `no` is a string
(not false), `1e-4` is a float.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from sparsegpt.config.hooks import validate_hooks
from sparsegpt.config.settings import (
    Budget,
    DataSettings,
    Defaults,
    DistributedSettings,
    EvalSettings,
    FinetuneSettings,
    KDSettings,
    LoraSection,
    Name,
    PruneSettings,
    ResolvedStage,
    RunSettings,
    Schedule,
    Stage,
    _nm,
    _pruned_fraction,
    _Strict,
)
from sparsegpt.core.errors import UserError

__all__ = ["Budget", "DataSettings", "Defaults", "DistributedSettings", "EvalSettings", "FinetuneSettings",
           "KDSettings", "LoraSection", "PruneSettings", "Recipe", "ResolvedStage", "Schedule", "Stage", "load_recipe",
           "to_dataclass"]

NOT_FINGERPRINTED = ("checkpoint_every", "log_every")  # finetune settings that change no result
T = TypeVar("T")


# --------------------------------------------------------------------------------------------------- YAML
class _RecipeLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 plain scalars and an error on duplicate keys."""

    yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers
                if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[str, int] = {}
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.value != "<<":
                if key_node.value in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key_node.value!r} (first on line {seen[key_node.value]})",
                        key_node.start_mark)
                seen[key_node.value] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:int", re.compile(r"^(?:[-+]?0b[01_]+|[-+]?0x[0-9a-fA-F_]+|[-+]?(?:0|[1-9][0-9_]*))$"),
    list("-+0123456789"))
_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:[0-9][0-9_]*\.[0-9_]*|\.[0-9_]+)(?:[eE][-+]?[0-9]+)?|[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+"
               r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


# ---------------------------------------------------------------------------------------------- recipe
class Recipe(_Strict):
    """A whole progressive run; see the module docstring."""

    name: Name
    model: str = Field(min_length=1)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    seed: int = 0
    data: DataSettings
    distributed: DistributedSettings = Field(default_factory=DistributedSettings)
    run: RunSettings = Field(default_factory=RunSettings)  # the lock, stop signals; not part of the fingerprint
    defaults: Defaults = Field(default_factory=Defaults)
    stages: list[Stage] | None = Field(None, min_length=1)
    schedule: Schedule | None = None
    budget: Budget | None = None  # the run's fine-tuning tokens, split over the stages (instead of steps/tokens)
    # accelerate trackers fed every evaluation (logs under RUN_DIR/trackers); not part of the fingerprint
    trackers: list[Literal["tensorboard", "wandb"]] = Field(default_factory=list)
    # how each finished stage's model is stored: "dense" (HF safetensors with zeros + mask.safetensors) or
    # "compact" (sparsegpt export format; read back bit-identically); not part of the fingerprint
    save: Literal["dense", "compact"] = "dense"

    @model_validator(mode="after")
    def _check(self) -> Recipe:
        if (self.stages is None) == (self.schedule is None):
            raise ValueError("give either stages (a list) or schedule (from/to/stages), not both" if self.stages
                             else "no stages: give stages (a list) or schedule (from/to/stages)")
        stages = self.stage_list()
        self._check_names(stages)
        self._check_order(stages)
        self._check_budget(stages)
        resolved = self.resolved_stages()
        self._check_distributed(resolved)
        for stage in resolved:
            _external_hook_check(stage.eval.hooks, f"{self._where(stage.index)}.eval.hooks")
        return self

    def stage_list(self) -> list[Stage]:
        """The stages as written, or as the schedule expands them."""
        return self.stages if self.stages is not None else self.schedule.expand()

    def _where(self, i: int) -> str:
        return f"stages[{i}]" if self.stages is not None else f"schedule (stage {i})"

    def _check_names(self, stages: list[Stage]) -> None:
        first: dict[str, int] = {}
        for i, stage in enumerate(stages):
            if stage.name in first:
                raise ValueError(f"{self._where(i)}.name: {stage.name!r} is already used by "
                                 f"{self._where(first[stage.name])}; stage names must be unique")
            first[stage.name] = i

    def _check_order(self, stages: list[Stage]) -> None:
        for i in range(1, len(stages)):
            prev, cur = stages[i - 1].target, stages[i].target
            here, before = f"{self._where(i)}.target", f"{self._where(i - 1)}.target"
            (n0, m0), (n1, m1) = _nm(prev), _nm(cur)
            if m1 and not m0 and prev > 0:
                raise ValueError(f"{here}: {cur!r} cannot follow the unstructured {before} {prev}: an unstructured "
                                 f"mask generally breaks every N:M pattern; start N:M from target 0 or an N:M stage")
            if m1 and m0 and (m1 % m0 or n1 * m0 < n0 * m1):
                raise ValueError(f"{here}: {cur!r} cannot follow {before} {prev!r}: a {prev} mask fits only N:M "
                                 f"patterns whose M is a multiple of {m0} and whose N/M is at least {n0}/{m0}")
            if not m1 and cur < _pruned_fraction(prev):
                what = f"{before} {prev}" if not m0 else f"the {prev} sparsity {_pruned_fraction(prev):g} of {before}"
                raise ValueError(f"{here}: {cur} is below {what}: targets never decrease")

    def _check_budget(self, stages: list[Stage]) -> None:
        if self.budget is None:
            return
        if self.budget.weights is not None and len(self.budget.weights) != len(stages):
            raise ValueError(f"budget.weights: {len(self.budget.weights)} weights for {len(stages)} stages; "
                             f"give one weight per stage")
        if not any(self.budget.weights or [1]):
            raise ValueError("budget.weights: all weights are 0; give at least one stage a positive weight")
        given = {k for k in ("steps", "tokens") if getattr(self.defaults.finetune, k) is not None}
        if given:
            raise ValueError(f"defaults.finetune.{min(given)}: the budget sets every stage's tokens; "
                             f"remove {min(given)} (or the budget)")
        for i, (stage, tokens) in enumerate(zip(stages, self.budget.split(len(stages)))):
            own = {k for k in ("steps", "tokens") if getattr(stage.finetune, k, None) is not None}
            if own == {"steps"} and stage.finetune.steps == 0 and tokens == 0:
                continue  # finetune: false with weight 0 says the same thing twice
            if own:
                what = "finetune: false" if stage.finetune.steps == 0 else f"finetune.{min(own)}"
                raise ValueError(f"{self._where(i)}: {what} conflicts with the budget, which gives this stage "
                                 f"{tokens} tokens; set its budget weight (0 = one-shot only) instead")

    def _check_distributed(self, resolved: list[ResolvedStage]) -> None:
        mp, dtype = self.distributed.mixed_precision, self.dtype
        if (mp, dtype) in (("fp16", "bfloat16"), ("bf16", "float16")):
            raise ValueError(f"distributed.mixed_precision {mp} conflicts with dtype {dtype}; "
                             f"use mixed_precision {'bf16' if dtype == 'bfloat16' else 'fp16'} or dtype float32")
        if self.distributed.zero_stage:
            norms = {s.finetune.max_grad_norm: s.index for s in resolved if s.finetune is not None}
            if len(norms) > 1:
                (a, i), (b, j) = list(norms.items())[:2]
                raise ValueError(f"{self._where(j)}.finetune.max_grad_norm: {b} differs from {a} in {self._where(i)}; "
                                 f"under ZeRO clipping is set once in the DeepSpeed config, so use one value")

    def resolved_stages(self) -> list[ResolvedStage]:
        """Every stage with defaults <- overrides deep-merged, targets parsed and eval hooks expanded."""
        return [self._resolve(i, stage) for i, stage in enumerate(self.stage_list())]

    def _resolve(self, i: int, stage: Stage) -> ResolvedStage:
        where = self._where(i)
        prune = _overlay(self.defaults.prune, stage.prune, f"{where}.prune")
        finetune = _overlay(self.defaults.finetune, stage.finetune, f"{where}.finetune")
        if self.budget is not None:
            tokens = self.budget.split(len(self.stage_list()))[i]
            finetune = finetune.model_copy(update={"steps": None, "tokens": tokens})
        evaluation = _overlay(self.defaults.eval, stage.eval, f"{where}.eval")
        if finetune.steps is None and finetune.tokens is None:
            raise ValueError(f"{where}.finetune: neither steps nor tokens is set (in defaults.finetune or the stage); "
                             f"set one, or finetune: false for one-shot only")
        n, m = _nm(stage.target)
        sparsity = 0.0 if m else stage.target
        if prune.allocation == "owl" and m:
            raise ValueError(f"{where}.prune.allocation: owl gives per-layer unstructured targets and cannot make "
                             f"{stage.target}; use allocation uniform")
        if prune.allocation == "owl" and sparsity > 0 and sparsity + prune.owl_lambda >= 1:
            raise ValueError(f"{where}.prune.owl_lambda: {prune.owl_lambda} lets layers reach "
                             f"{sparsity + prune.owl_lambda:g} >= 1 at target {sparsity}; "
                             f"use owl_lambda < {1 - sparsity:g}")
        hooks = self._expand_hooks(evaluation.hooks, f"{where}.eval.hooks")
        return ResolvedStage(
            index=i, name=stage.name, target=stage.target, sparsity=sparsity, prune_n=n, prune_m=m, prune=prune,
            finetune=None if 0 in (finetune.steps, finetune.tokens) else finetune,
            eval=evaluation.model_copy(update={"hooks": hooks}))

    def _expand_hooks(self, hooks: list[dict] | None, where: str) -> list[dict]:
        if hooks is None:
            return [{"type": "perplexity", "source": s} for s in self.data.eval] + [{"type": "sparsity"}]
        out = []
        for j, hook in enumerate(hooks):
            if hook["type"] == "perplexity" and "source" not in hook:
                out += [{**hook, "source": s} for s in self.data.eval]
                continue
            if hook["type"] == "perplexity" and hook["source"] not in self.data.eval:
                raise ValueError(f"{where}: hook {j} (perplexity) source {hook['source']!r} is not in data.eval "
                                 f"{self.data.eval}; list it there")
            out.append(dict(hook))
        return out

    def fingerprint(self) -> str:
        """sha256 of the canonical JSON of the resolved recipe: equal means the same run. Left out, as they change no
        result: the recipe name, `NOT_FINGERPRINTED` and eval.fail_on_error (so a run can resume with them changed)."""
        stages = []
        for stage in self.resolved_stages():
            body = stage.model_dump(mode="json")
            if body["finetune"] is not None:
                for key in NOT_FINGERPRINTED:
                    del body["finetune"][key]
            del body["eval"]["fail_on_error"]
            stages.append(body)
        canonical = {"model": self.model, "dtype": self.dtype, "seed": self.seed,
                     "data": self.data.model_dump(mode="json"),
                     "distributed": self.distributed.model_dump(mode="json"), "stages": stages}
        return hashlib.sha256(json.dumps(canonical, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    def to_yaml(self) -> str:
        """The recipe as YAML (defaults written out; stage overrides as given), loadable by `load_recipe`."""
        body = self.model_dump(mode="json", by_alias=True, exclude={"stages", "schedule"})
        if self.stages is not None:
            body["stages"] = [s.model_dump(mode="json", by_alias=True, exclude_unset=True) for s in self.stages]
        else:
            body["schedule"] = self.schedule.model_dump(mode="json", by_alias=True)
        return yaml.safe_dump(body, sort_keys=False, default_flow_style=False)


def to_dataclass(cls: type[T], settings: BaseModel | None, **given: Any) -> T:
    """`cls(...)` from the settings' fields of the same names plus `given` (values the recipe does not hold, such
    as a stage's target); a settings field `cls` lacks is left out, so the two shapes are never copied by hand."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: getattr(settings, k) for k in type(settings).model_fields if k in names} if settings else {}
    return cls(**{**values, **given})


def _deep_merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _overlay(base: _Strict, override: _Strict | None, where: str) -> Any:
    """`base` with the keys `override` sets deep-merged in; setting one of an exclusive pair drops the other."""
    if override is None:
        return base
    given = override.model_dump(exclude_unset=True)
    merged = base.model_dump()
    for a, b in getattr(type(base), "EXCLUSIVE", ()):
        for key, other in ((a, b), (b, a)):
            if given.get(key) is not None:
                merged[other] = None
    try:
        return type(base).model_validate(_deep_merge(merged, given))
    except ValidationError as e:
        raise ValueError(f"{where}: {_one_line(e.errors()[0])}") from None


def _external_hook_check(hooks: list[dict], where: str) -> None:
    """The hook registry's full check of the expanded hooks (known keys, importable custom hooks, lm-eval present)."""
    try:
        validate_hooks(hooks)
    except UserError as e:
        raise ValueError(f"{where}: {e}") from None


# --------------------------------------------------------------------------------------------- loading
def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _one_line(error: dict) -> str:
    msg = error["msg"].removeprefix("Value error, ")
    if error["type"] != "value_error" and not isinstance(error.get("input"), (dict, list)):
        msg += f" (got {error['input']!r})"
    where = _loc(error["loc"])
    return f"{where}: {msg}" if where else msg


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a YAML recipe; UserError names the file, the field path and what would be valid."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise UserError(f"cannot read recipe {path}: {e.strerror}") from None
    try:
        data = yaml.load(text, Loader=_RecipeLoader)  # a SafeLoader subclass: no arbitrary objects
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        context = f" ({e.context} on line {e.context_mark.line + 1})" if e.context and e.context_mark else ""
        raise UserError(f"{path}:{mark.line + 1}: invalid YAML: {e.problem or e.context}{context}") from None
    except yaml.YAMLError as e:
        raise UserError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a recipe is a YAML mapping with name, model, data and stages; "
                        f"got {type(data).__name__}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        lines = [_one_line(err) for err in e.errors()]
        more = f" (and {len(lines) - 1} more)" if len(lines) > 1 else ""
        err = UserError(f"{path}: {lines[0]}{more}")
        err.details = lines
        raise err from None
