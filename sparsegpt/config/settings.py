"""The recipe's sections as strict pydantic models: one per concern (prune, finetune with kd / lora, eval, data,
distributed), the field types they share, and `ResolvedStage`. They are the source of the library's configs
(`recipe.to_dataclass`); unknown keys are errors that list the allowed ones.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from sparsegpt.config.hooks import HOOKS
from sparsegpt.config.strict import Strict as _Strict
from sparsegpt.core.errors import UserError

PHASES = ("pruned", "finetuned")


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


def _pruned_fraction(target: float | str) -> float:
    """The fraction of weights a target prunes (N/M for N:M)."""
    n, m = _nm(target)
    return n / m if m else float(target)


# ------------------------------------------------------------------------------------------- sections
class ReconstructSettings(_Strict):
    """Layer-wise reconstruction after each decoder layer's solve (`reconstruct.ReconstructConfig`, same fields):
    Adam `passes` over the calibration rows, `batch` rows a step, on the dense or the pruned prefix's outputs."""

    passes: int = Field(3, ge=1)  # the defaults of reconstruct.ReconstructConfig too (it reads them from here)
    lr: float = Field(4e-3, gt=0)
    batch: int = Field(2, ge=1)
    inputs: Literal["dense", "pruned"] = "pruned"


class PruneSettings(_Strict):
    """How one stage prunes: the source of `sequential.PruneConfig` (same field names, built by `to_dataclass`);
    nsamples/seqlen size the calibration set and are not PruneConfig's (the calibration data is an argument)."""

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
    stream: bool = False  # one decoder layer in host memory at a time, read from and written to safetensors
    shared_hessian: bool = True  # linears that read one input share one Hessian, inverse and column loop
    dtype: Literal["float32", "float64"] = "float32"  # the solver's compute dtype; the model keeps its own
    forward_dtype: Literal["auto", "float32", "bfloat16"] = "float32"  # layer forwards' autocast (core.precision)
    hessian_dtype: Literal["float32", "bfloat16"] = "float32"  # per-sequence Hessian products (solver.add_gram_)
    prune_router: bool = False  # MoE routers (gates) stay dense unless asked
    prune_shared_experts: bool = False  # always-active shared experts (Qwen2-MoE) likewise
    min_expert_tokens: int | None = Field(None, ge=0)  # fewer routed tokens: pooled Hessian mixed in (None: width)
    reconstruct: ReconstructSettings | None = None  # layer-wise reconstruction after each layer's solve; None: off
    true_sequential: bool = False  # one forward a layer; groups solved in call order (prune/true_sequential.py)

    @model_validator(mode="after")
    def _one_forward_or_reconstruct(self) -> "PruneSettings":
        if self.true_sequential and self.reconstruct is not None:  # PruneConfig.validate says the same to API users
            raise ValueError("reconstruct trains towards the dense layer's outputs, which true_sequential never "
                             "computes; use one of them")
        return self

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

    teacher: str = Field("dense", min_length=1)  # where the teacher comes from; the rest is `distill.KDConfig`
    logit_weight: float = Field(1.0, ge=0)
    hidden_weight: float = Field(0.0, ge=0)
    temperature: float = Field(1.0, gt=0)
    ce_weight: float = Field(1.0, ge=0)
    layers: Literal["all"] | Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)] = "all"

    @model_validator(mode="after")
    def _some_weight(self) -> KDSettings:
        if self.logit_weight == 0 and self.hidden_weight == 0:
            raise ValueError("logit_weight and hidden_weight are both 0; make one > 0 or remove kd")
        return self


class LoraSection(_Strict):
    """LoRA adapters (merged back into the sparse weights after training); targets None = every pruned linear.
    The source of `lora.LoraSettings` (same fields)."""

    r: int = Field(ge=1)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    targets: list[str] | None = None


def _lr(value: Any) -> Any:
    """A learning rate > 0, or "auto" (chosen per stage on the tune split: `LrSearchSettings`)."""
    if value == "auto":
        return value
    if isinstance(value, bool):
        raise ValueError(f"{value} is neither a learning rate (e.g. 1e-4) nor 'auto'")
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"{value!r} is neither a learning rate (e.g. 1e-4) nor 'auto'") from None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and not value > 0:
        raise ValueError(f"Input should be greater than 0 (got {value!r})")
    return value


DEFAULT_LR_CANDIDATES = (1e-4, 3e-4, 1e-3, 3e-3)


class LrSearchSettings(_Strict):
    """How `lr: auto` chooses a stage's lr (sparsegpt/run/lr_search.py): for each candidate, a probe fine-tunes
    the stage's starting model for `tokens` train tokens (rounded up to whole optimizer steps; None = an eighth of
    the stage's steps, at least one) with the stage's settings and its warm-up/schedule scaled to the probe, then
    scores perplexity on `windows` windows of the fine-tuning source's tune split; the lowest wins (ties: the
    smaller lr)."""

    candidates: Annotated[list[Annotated[float, Field(gt=0)]], Field(min_length=1)] = \
        Field(default_factory=lambda: list(DEFAULT_LR_CANDIDATES))
    tokens: int | None = Field(None, ge=1)
    windows: int = Field(16, ge=1)

    @field_validator("candidates")
    @classmethod
    def _distinct(cls, values: list[float]) -> list[float]:
        if len(set(values)) != len(values):
            raise ValueError(f"candidates {values} repeat a value; list each lr once")
        return sorted(values)

    def probe_steps(self, stage_steps: int, tokens_per_step: int) -> int:
        """Optimizer steps of each probe: `tokens` rounded up to whole steps, or an eighth of the stage's (>= 1)."""
        if self.tokens is None:
            return max(1, round(stage_steps / 8))
        steps = math.ceil(self.tokens / tokens_per_step)
        if steps > stage_steps:
            raise UserError(f"lr_search.tokens {self.tokens} is more than the stage's {stage_steps} steps x "
                            f"{tokens_per_step} tokens; give at most {stage_steps * tokens_per_step} (a fraction)")
        return steps

    def cost(self, stage_steps: int, tokens_per_step: int) -> str:
        """What the probes cost, in words: candidates x probe steps as a fraction of the stage's steps."""
        steps = self.probe_steps(stage_steps, tokens_per_step)
        return (f"{len(self.candidates)} x {steps} steps ({steps * tokens_per_step} tokens) = "
                f"{len(self.candidates) * steps / stage_steps:.0%} of the stage's {stage_steps} steps")


class FinetuneSettings(_Strict):
    """Mask-preserving fine-tuning of one stage: `steps` or `tokens` (0 = none), optimiser, KD, LoRA.
    `lr: auto` chooses the lr per stage on the tune split (`lr_search` says how; None = the defaults)."""

    EXCLUSIVE: ClassVar = (("steps", "tokens"), ("warmup_steps", "warmup_ratio"))

    steps: int | None = Field(None, ge=0)
    tokens: int | None = Field(None, ge=0)
    lr: Annotated[float | Literal["auto"], BeforeValidator(_lr)] = 1e-4
    lr_search: LrSearchSettings | None = None
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int | None = Field(None, ge=0)
    warmup_ratio: float | None = Field(None, ge=0, lt=1)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    max_grad_norm: float | None = Field(1.0, gt=0)
    seqlen: int | None = Field(None, ge=1)  # None = the model's default
    gradient_checkpointing: bool = False
    checkpoint_every: int = Field(0, ge=0)
    log_every: int = Field(10, ge=1)  # optimizer steps between log lines
    kd: KDSettings | None = None
    lora: LoraSection | None = None

    @model_validator(mode="after")
    def _exclusive(self) -> FinetuneSettings:
        for a, b in self.EXCLUSIVE:
            if getattr(self, a) is not None and getattr(self, b) is not None:
                raise ValueError(f"give {a} or {b}, not both")
        if self.lr_search is not None and self.lr != "auto":
            raise ValueError(f"lr_search is set but lr is {self.lr:g}; use lr: auto, or drop lr_search "
                             "(a stage that sets its own lr: lr_search: null)")
        return self

    @property
    def search(self) -> LrSearchSettings | None:
        """The lr search this stage runs: None for a fixed lr, else `lr_search` or its defaults."""
        return None if self.lr != "auto" else self.lr_search or LrSearchSettings()

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
            if kind not in HOOKS:
                raise ValueError(f"hook {j} has type {kind!r}; valid types: {', '.join(HOOKS)}")
            missing = sorted(HOOKS[kind].required - HOOKS[kind].recipe_fills - set(hook))
            if missing:
                raise ValueError(f"hook {j} ({kind}) needs {', '.join(missing)}")
            if kind == "custom" and not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", str(hook["path"])):
                raise ValueError(f"hook {j} (custom): path {hook['path']!r} is not 'package.module:function'")
        return hooks


class DataSettings(_Strict):
    """Text sources (see data.load_text): calibration, fine-tuning (default: calibration), eval (default:
    [calibration])."""

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
    # auto = bf16 where the hardware multiplies bf16 natively, else no (sparsegpt.core.precision); resolved at run time
    mixed_precision: Literal["no", "bf16", "fp16", "auto"] = "no"

    @model_validator(mode="after")
    def _offload(self) -> DistributedSettings:
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage 2 or 3 (got 0)")
        if self.offload_params and self.zero_stage != 3:
            raise ValueError(f"offload_params needs zero_stage 3 (got {self.zero_stage})")
        return self


class RunSettings(_Strict):
    """How the run behaves on its cluster; changes no result (not in the fingerprint)."""

    # seconds from a stop signal (SIGTERM, SIGUSR1, Ctrl-C) within which the current step and its checkpoint must
    # finish; past them the process exits anyway (exit 75), resuming from the last complete checkpoint or phase
    preempt_grace_s: float = Field(300.0, gt=0)


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


class Budget(_Strict):
    """A run's fine-tuning tokens split over its stages: stage i gets floor(tokens · wᵢ / Σw) tokens (the last stage
    with a positive weight also the rounding remainder, so the stages add up to `tokens`); weight 0 = one-shot only.
    Without `weights` every stage gets an equal share. Each stage's tokens become steps as `finetune.tokens` do."""

    tokens: int = Field(ge=1)
    weights: list[Annotated[float, Field(ge=0)]] | None = Field(None, min_length=1)

    def split(self, n_stages: int) -> list[int]:
        weights = self.weights or [1.0] * n_stages
        total = sum(weights)
        shares = [int(self.tokens * w // total) for w in weights]
        last = max(i for i, w in enumerate(weights) if w > 0)
        shares[last] += self.tokens - sum(shares)
        return shares


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
    def pruned_fraction(self) -> float:
        """The fraction of weights this stage prunes (N/M for N:M)."""
        return _pruned_fraction(self.target)


