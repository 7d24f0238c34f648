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

`load_recipe(path)` validates; every error names its field path and what would be valid.
`Recipe.resolved_stages()` gives each stage its fully merged settings (defaults <- stage overrides, deep-merged;
lists such as eval hooks are replaced, not merged). A target of 0 means dense fine-tuning only.
Eval hooks default to one perplexity hook per `data.eval` source plus a sparsity report; a perplexity hook
without `source` stands for one per `data.eval` source, and a `source` must be listed in `data.eval`.
YAML is read with the YAML 1.2 rules for plain scalars: `2:4` is a string (not base-60 124), `no` is a string
(not false), `1e-4` is a float.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from sparsegpt.errors import UserError

HOOK_TYPES = {"perplexity": (), "lm_eval": ("tasks",), "sparsity": (), "samples": ("prompts",), "custom": ("path",)}
PHASES = ("pruned", "finetuned")


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


# ------------------------------------------------------------------------------------------ field types
def _target(value: Any) -> float | str:
    """A sparsity in [0, 1) as float, or a canonical "N:M" string with 0 < N < M."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not 0 <= value < 1:
            raise ValueError(f"{value} is not a sparsity in [0, 1); use e.g. 0.5, or an N:M pattern like '2:4'")
        return float(value)
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", value) if isinstance(value, str) else None
    if match is None:
        raise ValueError(f"{value!r} is neither a sparsity in [0, 1) (e.g. 0.5) nor an N:M pattern (e.g. '2:4')")
    n, m = int(match[1]), int(match[2])
    if not 0 < n < m:
        raise ValueError(f"{value!r} is not a valid N:M pattern: it needs 0 < N < M, e.g. '2:4' or '4:8'")
    return f"{n}:{m}"


def _name(value: Any) -> Any:
    if isinstance(value, str) and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", value):
        raise ValueError(f"{value!r} is not a valid name: use letters, digits, '.', '_', '-' (it names directories)")
    return value


def _no_finetune(value: Any) -> Any:
    """`finetune: false` is shorthand for `finetune: {steps: 0}` (one-shot only)."""
    if value is False:
        return {"steps": 0}
    if value is True:
        raise ValueError("finetune: true is not a setting; give a mapping (e.g. {steps: 100}) or false for one-shot")
    return value


Target = Annotated[float | str, BeforeValidator(_target)]
Name = Annotated[str, BeforeValidator(_name)]


def _nm(target: float | str) -> tuple[int, int]:
    n, m = target.split(":") if isinstance(target, str) else (0, 0)
    return int(n), int(m)


def _density(target: float | str) -> float:
    """The fraction of weights a target prunes (N/M for N:M)."""
    n, m = _nm(target)
    return n / m if m else float(target)


class _Strict(BaseModel):
    """Base of every recipe section: unknown keys are errors that list the allowed ones."""

    model_config = ConfigDict(extra="forbid", validate_by_name=True, validate_by_alias=True)

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            allowed = [field.alias or name for name, field in cls.model_fields.items()]
            for key in data:
                if key not in allowed and key not in cls.model_fields:
                    close = difflib.get_close_matches(str(key), allowed, n=1)
                    hint = f" (did you mean {close[0]!r}?)" if close else ""
                    raise ValueError(f"unknown key {key!r}{hint}; allowed: {', '.join(allowed)}")
        return data


# ------------------------------------------------------------------------------------------- sections
class PruneSettings(_Strict):
    """How one stage prunes (names match `sequential.PruneConfig`; nsamples/seqlen size the calibration set)."""

    method: Literal["sparsegpt", "wanda", "magnitude"] = "sparsegpt"
    allocation: Literal["uniform", "owl"] = "uniform"
    owl_lambda: float = Field(0.08, ge=0, lt=1)
    owl_m: float = Field(5.0, gt=0)
    nsamples: int = Field(128, ge=1)
    seqlen: int | None = Field(None, ge=1)  # None = the model's default (max positions, capped at 2048)
    blocksize: int = Field(128, ge=1)
    percdamp: float = Field(0.01, gt=0)
    include: str | None = None
    exclude: str | None = None
    batch_size: int = Field(8, ge=1)
    offload_activations: bool = False
    prune_router: bool = False  # MoE routers (gates) stay dense unless asked
    prune_shared_experts: bool = False  # always-active shared experts (Qwen2-MoE) likewise
    min_expert_tokens: int | None = Field(None, ge=0)  # fewer routed tokens: pooled Hessian mixed in (None: width)

    @field_validator("include", "exclude")
    @classmethod
    def _regex(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as e:
                raise ValueError(f"{value!r} is not a valid regular expression ({e}); e.g. 'mlp\\.' or 'q_proj|k_proj'")
        return value


class KDSettings(_Strict):
    """Knowledge distillation from a teacher: "dense" (the original model), "previous" (last stage) or a path."""

    teacher: str = Field("dense", min_length=1)
    logit_weight: float = Field(1.0, ge=0)
    hidden_weight: float = Field(0.0, ge=0)
    temperature: float = Field(1.0, gt=0)

    @model_validator(mode="after")
    def _some_weight(self) -> KDSettings:
        if self.logit_weight == 0 and self.hidden_weight == 0:
            raise ValueError("logit_weight and hidden_weight are both 0; make one > 0 or remove kd")
        return self


class LoraSettings(_Strict):
    """LoRA adapters (merged back into the sparse weights after training); targets None = every pruned linear."""

    r: int = Field(ge=1)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    targets: list[str] | None = None


class FinetuneSettings(_Strict):
    """Mask-preserving fine-tuning of one stage: `steps` or `tokens` (0 = none), optimiser, KD, LoRA."""

    EXCLUSIVE: ClassVar = (("steps", "tokens"), ("warmup_steps", "warmup_ratio"))

    steps: int | None = Field(None, ge=0)
    tokens: int | None = Field(None, ge=0)
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int | None = Field(None, ge=0)
    warmup_ratio: float | None = Field(None, ge=0, lt=1)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    max_grad_norm: float | None = Field(1.0, gt=0)
    seqlen: int | None = Field(None, ge=1)  # None = the model's default
    gradient_checkpointing: bool = False
    checkpoint_every: int = Field(0, ge=0)
    kd: KDSettings | None = None
    lora: LoraSettings | None = None

    @model_validator(mode="after")
    def _exclusive(self) -> FinetuneSettings:
        for a, b in self.EXCLUSIVE:
            if getattr(self, a) is not None and getattr(self, b) is not None:
                raise ValueError(f"give {a} or {b}, not both")
        return self

    def num_steps(self, world_size: int, *, micro_batch_size: int, grad_accum: int,
                  seqlen: int | None = None) -> int:
        """Optimizer steps: `steps`, or ceil(tokens / (seqlen × micro batch × grad accum × world size))."""
        if self.steps is not None:
            return self.steps
        if self.tokens is None:
            raise UserError("finetune: neither steps nor tokens is set; set one of them (0 = no fine-tuning)")
        seq = self.seqlen or seqlen
        if seq is None:
            raise UserError("finetune.tokens needs a sequence length to become steps: set finetune.seqlen")
        if world_size < 1:
            raise UserError(f"world_size must be >= 1, got {world_size}")
        return math.ceil(self.tokens / (seq * micro_batch_size * grad_accum * world_size))

    def to_config(self, *, seed: int, micro_batch_size: int, grad_accum: int, world_size: int,
                  seqlen: int | None = None):
        """The trainer's `finetune.FinetuneConfig` for this stage (tokens and warmup_ratio become steps)."""
        from sparsegpt.finetune import FinetuneConfig

        steps = self.num_steps(world_size, micro_batch_size=micro_batch_size, grad_accum=grad_accum, seqlen=seqlen)
        warmup = self.warmup_steps if self.warmup_ratio is None else round(self.warmup_ratio * steps)
        kd, lora = self.kd, self.lora
        return FinetuneConfig(
            steps=steps, lr=self.lr, weight_decay=self.weight_decay, warmup_steps=warmup or 0,
            schedule=self.schedule, micro_batch_size=micro_batch_size, grad_accum=grad_accum,
            max_grad_norm=self.max_grad_norm, seed=seed, gradient_checkpointing=self.gradient_checkpointing,
            kd_logit_weight=kd.logit_weight if kd else 0.0, kd_hidden_weight=kd.hidden_weight if kd else 0.0,
            kd_temperature=kd.temperature if kd else 1.0, lora_r=lora.r if lora else 0,
            lora_alpha=lora.alpha if lora else 16, lora_dropout=lora.dropout if lora else 0.0,
            lora_targets=lora.targets if lora else None,
            checkpoint_every=self.checkpoint_every)


class EvalSettings(_Strict):
    """Evaluation hooks run after pruning and after fine-tuning (`phases`); None = the defaults from data.eval."""

    hooks: list[dict[str, Any]] | None = None
    fail_on_error: bool = False
    phases: list[Literal["pruned", "finetuned"]] = list(PHASES)

    @field_validator("hooks")
    @classmethod
    def _hooks(cls, hooks: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        for j, hook in enumerate(hooks or []):
            kind = hook.get("type")
            if kind not in HOOK_TYPES:
                raise ValueError(f"hook {j} has type {kind!r}; valid types: {', '.join(HOOK_TYPES)}")
            missing = [key for key in HOOK_TYPES[kind] if key not in hook]
            if missing:
                raise ValueError(f"hook {j} ({kind}) needs {', '.join(missing)}")
            if kind == "custom" and not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", str(hook["path"])):
                raise ValueError(f"hook {j} (custom): path {hook['path']!r} is not 'package.module:function'")
        return hooks


class DataSettings(_Strict):
    """Text sources (see data.load_text): calibration, fine-tuning (default: calibration), eval (default: [calibration])."""

    calibration: str = Field(min_length=1)
    finetune: str | None = Field(None, min_length=1)
    eval: list[Annotated[str, Field(min_length=1)]] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _defaults(self) -> DataSettings:
        self.finetune = self.finetune or self.calibration
        self.eval = self.eval or [self.calibration]
        return self


class DistributedSettings(_Strict):
    """ZeRO stage (0 = single process / plain DDP), CPU offload, batch geometry, mixed precision."""

    zero_stage: Literal[0, 2, 3] = 0
    offload_optimizer: bool = False
    offload_params: bool = False
    micro_batch_size: int = Field(1, ge=1)
    grad_accum: int = Field(1, ge=1)
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"

    @model_validator(mode="after")
    def _offload(self) -> DistributedSettings:
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage 2 or 3 (got 0)")
        if self.offload_params and self.zero_stage != 3:
            raise ValueError(f"offload_params needs zero_stage 3 (got {self.zero_stage})")
        return self


class Defaults(_Strict):
    """Settings every stage starts from."""

    prune: PruneSettings = Field(default_factory=PruneSettings)
    finetune: FinetuneSettings = Field(default_factory=FinetuneSettings)
    eval: EvalSettings = Field(default_factory=EvalSettings)

    _finetune_false = field_validator("finetune", mode="before")(_no_finetune)


class Stage(_Strict):
    """One stage as written: a target plus optional overrides of the defaults."""

    name: Name
    target: Target
    prune: PruneSettings | None = None
    finetune: FinetuneSettings | None = None
    eval: EvalSettings | None = None

    _finetune_false = field_validator("finetune", mode="before")(_no_finetune)


class Schedule(_Strict):
    """Shorthand for `stages`: `stages` targets from `from` to `to`, linear or cubic (Zhu & Gupta 2017)."""

    from_: float = Field(alias="from", ge=0, lt=1)
    to: float = Field(ge=0, lt=1)
    stages: int = Field(ge=2)
    curve: Literal["linear", "cubic"] = "linear"
    name_prefix: str = "s"

    @model_validator(mode="after")
    def _increasing(self) -> Schedule:
        if self.to <= self.from_:
            raise ValueError(f"to {self.to} must be above from {self.from_}")
        targets = self.targets()
        if len(set(targets)) != len(targets):
            raise ValueError(f"from {self.from_} and to {self.to} are too close for {self.stages} distinct "
                             f"4-decimal targets ({targets}); use fewer stages")
        return self

    def targets(self) -> list[float]:
        """Targets rounded to 4 decimals; cubic: s_t = to + (from - to)(1 - t/n)^3; first/last exactly from/to."""
        n = self.stages - 1
        if self.curve == "linear":
            values = [self.from_ + (self.to - self.from_) * t / n for t in range(self.stages)]
        else:
            values = [self.to + (self.from_ - self.to) * (1 - t / n) ** 3 for t in range(self.stages)]
        values = [round(v, 4) for v in values]
        values[0], values[-1] = self.from_, self.to
        return values

    def expand(self) -> list[Stage]:
        """The stages this schedule stands for, named prefix + percent (e.g. s50, s71.11)."""
        return [Stage(name=f"{self.name_prefix}{round(t * 100, 2):g}", target=t) for t in self.targets()]


class ResolvedStage(BaseModel):
    """A stage with fully merged settings; finetune None = one-shot only; N:M stages have sparsity 0."""

    model_config = ConfigDict(frozen=True)

    index: int
    name: str
    target: float | str
    sparsity: float
    prune_n: int
    prune_m: int
    prune: PruneSettings
    finetune: FinetuneSettings | None
    eval: EvalSettings

    @property
    def density_target(self) -> float:
        """The fraction of weights this stage prunes (N/M for N:M)."""
        return _density(self.target)


# ---------------------------------------------------------------------------------------------- recipe
class Recipe(_Strict):
    """A whole progressive run; see the module docstring."""

    name: Name
    model: str = Field(min_length=1)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    seed: int = 0
    data: DataSettings
    distributed: DistributedSettings = Field(default_factory=DistributedSettings)
    defaults: Defaults = Field(default_factory=Defaults)
    stages: list[Stage] | None = Field(None, min_length=1)
    schedule: Schedule | None = None
    # accelerate trackers fed every evaluation (logs under RUN_DIR/trackers); not part of the fingerprint
    trackers: list[Literal["tensorboard", "wandb"]] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> Recipe:
        if (self.stages is None) == (self.schedule is None):
            raise ValueError("give either stages (a list) or schedule (from/to/stages), not both" if self.stages
                             else "no stages: give stages (a list) or schedule (from/to/stages)")
        stages = self.stage_list()
        self._check_names(stages)
        self._check_order(stages)
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
            if not m1 and cur < _density(prev):
                what = f"{before} {prev}" if not m0 else f"the {prev} sparsity {_density(prev):g} of {before}"
                raise ValueError(f"{here}: {cur} is below {what}: targets never decrease")

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
                             f"{sparsity + prune.owl_lambda:g} >= 1 at target {sparsity}; use owl_lambda < {1 - sparsity:g}")
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
        result: the recipe name, finetune.checkpoint_every and eval.fail_on_error (so a run can resume with them changed)."""
        stages = []
        for stage in self.resolved_stages():
            body = stage.model_dump(mode="json")
            if body["finetune"] is not None:
                del body["finetune"]["checkpoint_every"]
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
    """The evaluation module's own check of hook options (known keys, importable custom hooks, lm-eval present)."""
    from sparsegpt.evaluation import validate_hooks

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


def deepspeed_config(recipe: Recipe, world_size: int) -> dict | None:
    """The DeepSpeed config for the recipe's ZeRO settings, or None for zero_stage 0 (single process / DDP).

    Built on the trainer's `finetune.deepspeed_config` (bucket sizes stay "auto" for accelerate to size from the
    model) with the batch geometry, clipping and precision made explicit."""
    from sparsegpt.finetune import deepspeed_config as trainer_config

    dist = recipe.distributed
    if world_size < 1:
        raise UserError(f"world_size must be >= 1, got {world_size}")
    if dist.zero_stage == 0:
        return None
    norms = [s.finetune.max_grad_norm for s in recipe.resolved_stages() if s.finetune is not None]
    config = trainer_config(dist.zero_stage, dist.offload_optimizer, dist.offload_params, dist.micro_batch_size,
                            dist.grad_accum, norms[0] if norms else None)  # one value across stages (checked)
    config["train_batch_size"] = dist.micro_batch_size * dist.grad_accum * world_size
    config["bf16"] = {"enabled": dist.mixed_precision == "bf16"}
    config["fp16"] = {"enabled": dist.mixed_precision == "fp16"}
    return config
