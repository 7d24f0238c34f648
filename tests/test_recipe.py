"""Recipe schema: shipped recipes load, every rule gives its own error, schedules, merging, fingerprints, DeepSpeed."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from sparsegpt.config.recipe import FinetuneSettings, Recipe, Schedule, load_recipe
from sparsegpt.core.errors import UserError
from sparsegpt.heal.dsconfig import recipe_deepspeed_config as deepspeed_config
from sparsegpt.run.configs import finetune_config

RECIPES = sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml"))

BASE = """\
name: t
model: m
data: {calibration: stdlib-docs}
defaults:
  finetune: {steps: 2}
stages:
  - {name: a, target: 0.5}
  - {name: b, target: 0.7}
"""


def load(tmp_path: Path, text: str) -> Recipe:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return load_recipe(path)


def recipe(**overrides) -> Recipe:
    body = yaml.safe_load(BASE)
    body.update(overrides)
    return Recipe.model_validate(body)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipe_loads_and_round_trips(path, tmp_path):
    r = load_recipe(path)
    header = path.read_text().splitlines()
    assert header[0].startswith("#")
    assert any(f"train/progressive.py --recipe recipes/{path.name}" in line for line in header if line.startswith("#"))
    assert r.name == path.stem
    again = load(tmp_path, r.to_yaml())
    assert again.fingerprint() == r.fingerprint()
    assert again.resolved_stages() == r.resolved_stages()


def test_demo_recipes_share_everything_but_fine_tuning():
    demo, oneshot = load_recipe("recipes/demo.yaml"), load_recipe("recipes/demo_oneshot.yaml")
    d, o = demo.resolved_stages(), oneshot.resolved_stages()
    assert [s.target for s in d] == [s.target for s in o] == [0.9]
    assert [s.prune for s in d] == [s.prune for s in o] and [s.eval.hooks for s in d] == [s.eval.hooks for s in o]
    assert all(s.finetune is not None for s in d) and all(s.finetune is None for s in o)
    assert sum(s.finetune.tokens for s in d) == demo.budget.tokens
    assert demo.model == oneshot.model == "smollm2-135m" and demo.distributed.zero_stage == 0
    assert demo.data.calibration == oneshot.data.calibration and demo.seed == oneshot.seed


def _stages(*targets) -> str:
    return "stages:\n" + "".join(f"  - {{name: s{i}, target: {t}}}\n" for i, t in enumerate(targets))


HEAD = "name: t\nmodel: m\ndata: {calibration: stdlib-docs}\ndefaults: {finetune: {steps: 2}}\n"
INVALID = {
    "unknown top key": (BASE + "modle: x\n", "unknown key 'modle' (did you mean 'model'?); allowed: name, model, dtype"),
    "unknown nested key": (BASE.replace("{steps: 2}", "{steps: 2, lrate: 0.1}"),
                           "defaults.finetune: unknown key 'lrate'"),
    "unknown stage key": (HEAD + "stages:\n  - {name: a, target: 0.5, prun: {}}\n", "stages[0]: unknown key 'prun'"),
    "decreasing": (HEAD + _stages(0.5, 0.7, 0.6),
                   "stages[2].target: 0.6 is below stages[1].target 0.7: targets never decrease"),
    "N >= M": (HEAD + _stages('"4:2"'), "stages[0].target: '4:2' is not a valid N:M pattern: it needs 0 < N < M"),
    "not N:M": (HEAD + _stages('"2:x"'), "stages[0].target: '2:x' is neither a sparsity in [0, 1)"),
    "N:M after unstructured": (HEAD + _stages(0.5, "2:4"),
                               "stages[1].target: '2:4' cannot follow the unstructured stages[0].target 0.5"),
    "unstructured below N:M": (HEAD + _stages(0, "2:4", 0.4),
                               "stages[2].target: 0.4 is below the 2:4 sparsity 0.5 of stages[1].target"),
    "N:M to coarser density": (HEAD + _stages("2:4", "2:8"), "stages[1].target: '2:8' cannot follow"),
    "N:M to other group": (HEAD + _stages("2:4", "3:6"), "whose M is a multiple of 4"),
    "sparsity 1.0": (HEAD + _stages(0.5, 1.0), "stages[1].target: 1.0 is not a sparsity in [0, 1)"),
    "negative sparsity": (HEAD + _stages(-0.1), "stages[0].target: -0.1 is not a sparsity in [0, 1)"),
    "stages and schedule": (BASE + "schedule: {from: 0.5, to: 0.9, stages: 3}\n", "not both"),
    "no stages": (HEAD, "no stages: give stages (a list) or schedule"),
    "malformed YAML": (BASE.replace("model: m\n", "model: m: x\n"), ":2: invalid YAML: mapping values are not allowed"),
    "unclosed flow": (HEAD + "stages:\n  - {name: a, target: 0.5\n",
                      ":7: invalid YAML: expected ',' or '}', but got '<stream end>' (while parsing a flow mapping "
                      "on line 6)"),
    "duplicate key": (HEAD + "seed: 1\nseed: 2\n" + _stages(0.5), ":6: invalid YAML: duplicate key 'seed' (first on line 5)"),
    "negative steps": (HEAD + "stages:\n  - {name: a, target: 0.5, finetune: {steps: -1}}\n",
                       "stages[0].finetune.steps: Input should be greater than or equal to 0 (got -1)"),
    "zero lr": (BASE.replace("{steps: 2}", "{steps: 2, lr: 0}"), "defaults.finetune.lr: Input should be greater than 0"),
    "steps and tokens": (BASE.replace("{steps: 2}", "{steps: 2, tokens: 9}"), "give steps or tokens, not both"),
    "no steps": (BASE.replace("{steps: 2}", "{lr: 0.1}"), "stages[0].finetune: neither steps nor tokens is set"),
    "finetune true": (HEAD + "stages:\n  - {name: a, target: 0.5, finetune: true}\n", "finetune: true is not a setting"),
    "bad hook type": (BASE.replace("{steps: 2}", "{steps: 2}\n  eval: {hooks: [{type: ppl}]}"),
                      "defaults.eval.hooks: hook 0 has type 'ppl'; valid types: perplexity, lm_eval"),
    "hook missing key": (BASE.replace("{steps: 2}", "{steps: 2}\n  eval: {hooks: [{type: lm_eval}]}"),
                         "hook 0 (lm_eval) needs tasks"),
    "hook unknown option": (BASE.replace("{steps: 2}", "{steps: 2}\n  eval: {hooks: [{type: sparsity, every: 2}]}"),
                            "stages[0].eval.hooks: eval hook #0 (sparsity)"),
    "hook source not in data.eval": (
        BASE.replace("{steps: 2}", "{steps: 2}\n  eval: {hooks: [{type: perplexity, source: c4}]}"),
        "stages[0].eval.hooks: hook 0 (perplexity) source 'c4' is not in data.eval ['stdlib-docs']"),
    "bad phase": (BASE.replace("{steps: 2}", "{steps: 2}\n  eval: {phases: [healed]}"), "defaults.eval.phases[0]"),
    "duplicate names": (HEAD + "stages:\n  - {name: a, target: 0.5}\n  - {name: a, target: 0.6}\n",
                        "stages[1].name: 'a' is already used by stages[0]"),
    "bad name": (HEAD + "stages:\n  - {name: a/b, target: 0.5}\n", "stages[0].name: 'a/b' is not a valid name"),
    "offload params on ZeRO-2": (BASE + "distributed: {zero_stage: 2, offload_params: true}\n",
                                 "distributed: offload_params needs zero_stage 3 (got 2)"),
    "zero stage 1": (BASE + "distributed: {zero_stage: 1}\n", "distributed.zero_stage: Input should be 0, 2 or 3"),
    "precision conflict": (BASE + "dtype: bfloat16\ndistributed: {mixed_precision: fp16}\n",
                           "mixed_precision fp16 conflicts with dtype bfloat16"),
    "clipping differs under ZeRO": (
        HEAD + "distributed: {zero_stage: 2}\nstages:\n  - {name: a, target: 0.5}\n"
               "  - {name: b, target: 0.6, finetune: {max_grad_norm: 0.5}}\n",
        "stages[1].finetune.max_grad_norm: 0.5 differs from 1.0 in stages[0]"),
    "owl with N:M": (HEAD + "stages:\n  - {name: a, target: '2:4', prune: {allocation: owl}}\n",
                     "stages[0].prune.allocation: owl gives per-layer unstructured targets"),
    "owl past 1": (HEAD + "stages:\n  - {name: a, target: 0.95, prune: {allocation: owl, owl_lambda: 0.1}}\n",
                   "stages[0].prune.owl_lambda: 0.1 lets layers reach 1.05 >= 1"),
    "bad regex": (HEAD + "stages:\n  - {name: a, target: 0.5, prune: {include: 'mlp('}}\n",
                  "stages[0].prune.include: Value error, 'mlp(' is not a valid regular expression"),
    "kd without weight": (BASE.replace("{steps: 2}", "{steps: 2, kd: {logit_weight: 0}}"),
                          "defaults.finetune.kd: logit_weight and hidden_weight are both 0"),
    "schedule backwards": (HEAD + "schedule: {from: 0.8, to: 0.5, stages: 3}\n", "schedule: to 0.5 must be above from 0.8"),
    "schedule one stage": (HEAD + "schedule: {from: 0.5, to: 0.8, stages: 1}\n", "schedule.stages: Input should be greater"),
    "schedule too fine": (HEAD + "schedule: {from: 0.5, to: 0.5002, stages: 5}\n", "too close for 5 distinct"),
    "not a mapping": ("- a\n- b\n", "a recipe is a YAML mapping"),
    "missing model": (BASE.replace("model: m\n", ""), "model: Field required"),
}


@pytest.mark.parametrize("text, message", INVALID.values(), ids=INVALID.keys())
def test_invalid_recipe_names_the_problem(tmp_path, text, message):
    with pytest.raises(UserError) as info:
        load(tmp_path, text)
    assert message.replace("Value error, ", "") in str(info.value)
    assert str(info.value).startswith(str(tmp_path / "r.yaml"))
    assert "\n" not in str(info.value)


def test_all_errors_are_kept_in_details(tmp_path):
    with pytest.raises(UserError) as info:
        load(tmp_path, BASE.replace("{steps: 2}", "{steps: -1, lr: -2}"))
    assert info.value.details == ["defaults.finetune.steps: Input should be greater than or equal to 0 (got -1)",
                                  "defaults.finetune.lr: Input should be greater than 0 (got -2)"]
    assert "(and 1 more)" in str(info.value)


def test_yaml12_scalars(tmp_path):
    r = load(tmp_path, HEAD.replace("{steps: 2}", "{steps: 2, lr: 1e-4}") + "distributed: {mixed_precision: no}\n"
             + "stages:\n  - {name: a, target: 0}\n  - {name: b, target: 2:4}\n")
    assert r.stages[1].target == "2:4" and r.distributed.mixed_precision == "no"
    assert r.defaults.finetune.lr == 1e-4


def test_targets_resolve_to_sparsity_or_n_m():
    a, b, c = recipe(stages=[{"name": "a", "target": 0}, {"name": "b", "target": " 2 : 4 "},
                             {"name": "c", "target": 0.75}]).resolved_stages()
    assert (a.sparsity, a.prune_n, a.prune_m) == (0.0, 0, 0)
    assert (b.target, b.sparsity, b.prune_n, b.prune_m, b.pruned_fraction) == ("2:4", 0.0, 2, 4, 0.5)
    assert (c.sparsity, c.prune_n, c.prune_m) == (0.75, 0, 0)


def test_n_m_chains_that_keep_the_earlier_mask_are_allowed():
    targets = [s.target for s in recipe(stages=[{"name": f"s{i}", "target": t} for i, t in
                                                enumerate([0, "1:2", "2:4", "6:8", 0.8])]).resolved_stages()]
    assert targets == [0.0, "1:2", "2:4", "6:8", 0.8]


def test_linear_schedule():
    s = Schedule.model_validate({"from": 0.5, "to": 0.9, "stages": 5})
    assert s.targets() == [0.5, 0.6, 0.7, 0.8, 0.9]
    assert [x.name for x in s.expand()] == ["s50", "s60", "s70", "s80", "s90"]


def test_cubic_schedule_follows_zhu_gupta():
    s = Schedule.model_validate({"from": 0.5, "to": 0.9, "stages": 5, "curve": "cubic", "name_prefix": "p"})
    # s_t = 0.9 + (0.5 - 0.9)(1 - t/4)^3 by hand: 0.5, 0.73125, 0.85, 0.89375, 0.9
    expected = [0.5, 0.73125, 0.85, 0.89375, 0.9]
    assert all(abs(a - b) <= 5e-5 + 1e-12 for a, b in zip(s.targets(), expected, strict=True))
    assert all(round(t, 4) == t for t in s.targets())
    assert s.expand()[1].name.startswith("p73.1")


def test_schedule_first_last_exact_and_monotone():
    for curve in ("linear", "cubic"):
        s = Schedule.model_validate({"from": 0.12345, "to": 0.87654, "stages": 7, "curve": curve})
        t = s.targets()
        assert t[0] == 0.12345 and t[-1] == 0.87654
        assert all(a < b for a, b in zip(t, t[1:]))


def test_schedule_stages_inherit_defaults(tmp_path):
    r = load(tmp_path, HEAD.replace("{steps: 2}", "{steps: 7}, prune: {nsamples: 3}")
             + "schedule: {from: 0.5, to: 0.8, stages: 4, curve: cubic}\n")
    stages = r.resolved_stages()
    assert [s.name for s in stages] == ["s50", "s71.11", "s78.89", "s80"]
    assert all(s.finetune.steps == 7 and s.prune.nsamples == 3 for s in stages)


def test_deep_merge_of_defaults():
    r = recipe(
        defaults={"prune": {"nsamples": 16, "blocksize": 64},
                  "finetune": {"steps": 10, "lr": 3e-4, "warmup_steps": 5,
                               "kd": {"teacher": "dense", "temperature": 2.0}},
                  "eval": {"hooks": [{"type": "sparsity"}], "phases": ["finetuned"]}},
        stages=[{"name": "a", "target": 0.5},
                {"name": "b", "target": 0.6, "prune": {"nsamples": 32},
                 "finetune": {"tokens": 1000, "warmup_ratio": 0.1, "kd": {"logit_weight": 0.5}},
                 "eval": {"hooks": [{"type": "perplexity"}]}},
                {"name": "c", "target": 0.7, "finetune": False}])
    a, b, c = r.resolved_stages()
    assert (a.prune.nsamples, a.prune.blocksize, a.finetune.steps, a.finetune.warmup_steps) == (16, 64, 10, 5)
    assert (b.prune.nsamples, b.prune.blocksize) == (32, 64)
    f = b.finetune
    assert (f.steps, f.tokens, f.lr, f.warmup_steps, f.warmup_ratio) == (None, 1000, 3e-4, None, 0.1)
    assert (f.kd.teacher, f.kd.temperature, f.kd.logit_weight) == ("dense", 2.0, 0.5)
    assert b.eval.hooks == [{"type": "perplexity", "source": "stdlib-docs"}]  # lists replace; source from data.eval
    assert b.eval.phases == ["finetuned"]
    assert c.finetune is None
    assert r.defaults.finetune.steps == 10  # merging does not touch the defaults


def test_default_hooks_come_from_data_eval():
    r = recipe(data={"calibration": "c4", "eval": ["wikitext2", "ptb"]})
    assert r.data.finetune == "c4"
    assert r.resolved_stages()[0].eval.hooks == [{"type": "perplexity", "source": "wikitext2"},
                                                 {"type": "perplexity", "source": "ptb"}, {"type": "sparsity"}]


def test_steps_zero_is_one_shot():
    r = recipe(stages=[{"name": "a", "target": 0.5, "finetune": {"steps": 0}},
                       {"name": "b", "target": 0.6, "finetune": {"tokens": 0}}])
    assert [s.finetune for s in r.resolved_stages()] == [None, None]


def test_fingerprint_stable_and_sensitive(tmp_path):
    r = recipe()
    assert r.fingerprint() == recipe().fingerprint() == load(tmp_path, BASE).fingerprint()
    assert len(r.fingerprint()) == 64
    cosmetic = recipe(name="other", defaults={"finetune": {"steps": 2, "checkpoint_every": 5},
                                              "eval": {"fail_on_error": True}})
    assert cosmetic.fingerprint() == r.fingerprint()
    explicit = recipe(defaults={"finetune": {"steps": 2, "lr": 1e-4}, "prune": {"method": "sparsegpt"}})
    assert explicit.fingerprint() == r.fingerprint()  # stating a default changes nothing
    for changed in (recipe(defaults={"finetune": {"steps": 2, "lr": 2e-4}}), recipe(seed=1),
                    recipe(stages=[{"name": "a", "target": 0.5}, {"name": "b", "target": 0.71}]),
                    recipe(distributed={"micro_batch_size": 2})):
        assert changed.fingerprint() != r.fingerprint()


def test_schedule_and_equal_stages_share_a_fingerprint():
    listed = recipe(stages=[{"name": "s50", "target": 0.5}, {"name": "s70", "target": 0.7}])
    scheduled = recipe(stages=None, schedule={"from": 0.5, "to": 0.7, "stages": 2})
    assert listed.fingerprint() == scheduled.fingerprint()


def test_tokens_to_steps():
    f = FinetuneSettings(tokens=10_000, seqlen=128)
    # tokens per step = 128 x 2 x 3 x world size
    assert f.num_steps(4, micro_batch_size=2, grad_accum=3) == math.ceil(10_000 / 3072) == 4
    assert f.num_steps(1, micro_batch_size=2, grad_accum=3) == math.ceil(10_000 / 768) == 14
    assert FinetuneSettings(tokens=768).num_steps(1, micro_batch_size=2, grad_accum=3, seqlen=128) == 1
    assert FinetuneSettings(steps=9).num_steps(8, micro_batch_size=2, grad_accum=3) == 9
    with pytest.raises(UserError, match="set finetune.seqlen"):
        FinetuneSettings(tokens=10).num_steps(1, micro_batch_size=1, grad_accum=1)


def test_finetune_config_maps_onto_the_trainer():
    r = recipe(seed=3, distributed={"micro_batch_size": 2, "grad_accum": 3},
               defaults={"finetune": {"tokens": 10_000, "seqlen": 128, "warmup_ratio": 0.1, "lr": 3e-4,
                                      "kd": {"logit_weight": 0.5, "temperature": 2.0, "layers": [0, 1]},
                                      "lora": {"r": 8, "targets": ["q_proj"], "dropout": 0.05}}})
    stage = r.resolved_stages()[0]
    cfg = finetune_config(stage, r, world_size=1, seqlen=64)
    assert (cfg.steps, cfg.warmup_steps, cfg.lr, cfg.seed, cfg.micro_batch_size, cfg.grad_accum) == (14, 1, 3e-4, 3, 2, 3)
    kd = cfg.kd
    assert (kd.logit_weight, kd.hidden_weight, kd.temperature, kd.ce_weight, kd.layers) == (0.5, 0.0, 2.0, 1.0, [0, 1])
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.targets) == (8, 16, 0.05, ["q_proj"])
    assert finetune_config(r.resolved_stages()[1], r, world_size=1, seqlen=64).seed == 4  # recipe seed + index


def test_deepspeed_config_per_zero_stage():
    assert deepspeed_config(recipe(), 4) is None
    two = deepspeed_config(recipe(distributed={"zero_stage": 2, "micro_batch_size": 2, "grad_accum": 3,
                                               "mixed_precision": "bf16"}), 4)
    assert two["zero_optimization"]["stage"] == 2
    assert "stage3_gather_16bit_weights_on_model_save" not in two["zero_optimization"]
    assert (two["train_batch_size"], two["train_micro_batch_size_per_gpu"], two["gradient_accumulation_steps"]) == \
        (24, 2, 3)
    assert two["bf16"] == {"enabled": True} and two["fp16"] == {"enabled": False}
    assert two["gradient_clipping"] == 1.0
    three = deepspeed_config(recipe(distributed={"zero_stage": 3, "offload_optimizer": True, "offload_params": True,
                                                 "mixed_precision": "fp16"}), 8)
    zero = three["zero_optimization"]
    assert zero["stage"] == 3 and zero["stage3_gather_16bit_weights_on_model_save"] is True
    assert zero["offload_optimizer"]["device"] == zero["offload_param"]["device"] == "cpu"
    assert three["fp16"] == {"enabled": True} and three["train_batch_size"] == 8
    no_clip = deepspeed_config(recipe(distributed={"zero_stage": 2},
                                      defaults={"finetune": {"steps": 2, "max_grad_norm": None}}), 1)
    assert no_clip["gradient_clipping"] == 0.0


def test_deepspeed_config_is_accepted_by_accelerate():
    from accelerate.utils import DeepSpeedPlugin

    cfg = deepspeed_config(recipe(distributed={"zero_stage": 3, "offload_optimizer": True, "mixed_precision": "bf16",
                                               "grad_accum": 2}), 2)
    plugin = DeepSpeedPlugin(hf_ds_config=cfg)
    assert plugin.zero_stage == 3 and plugin.gradient_accumulation_steps == 2
    assert plugin.hf_ds_config.is_zero3() and plugin.hf_ds_config.is_offload()


def _budget_recipe(budget: dict, **overrides) -> Recipe:
    body = yaml.safe_load(BASE)
    body["defaults"] = {"finetune": {"seqlen": 128}}
    body["stages"] = [{"name": f"s{t}", "target": t / 100} for t in (50, 70, 80, 90)]
    body["budget"] = budget
    body.update(overrides)
    return Recipe.model_validate(body)


def test_budget_splits_tokens_over_stages_and_adds_up():
    equal = _budget_recipe({"tokens": 10_000})
    assert [s.finetune.tokens for s in equal.resolved_stages()] == [2500, 2500, 2500, 2500]
    final_heavy = _budget_recipe({"tokens": 16384, "weights": [1, 1, 1, 3]})
    tokens = [s.finetune.tokens for s in final_heavy.resolved_stages()]
    assert tokens == [2730, 2730, 2730, 8194] and sum(tokens) == 16384
    one_shot_first = _budget_recipe({"tokens": 9000, "weights": [0, 1, 1, 1]})
    stages = one_shot_first.resolved_stages()
    assert stages[0].finetune is None and [s.finetune.tokens for s in stages[1:]] == [3000, 3000, 3000]
    # the budget is part of what the run is: another split is another run
    assert equal.fingerprint() != _budget_recipe({"tokens": 10_000, "weights": [1, 1, 1, 2]}).fingerprint()


@pytest.mark.parametrize("budget, overrides, message", [
    ({"tokens": 100, "weights": [1, 1]}, {}, "budget.weights: 2 weights for 4 stages"),
    ({"tokens": 100, "weights": [0, 0, 0, 0]}, {}, "all weights are 0"),
    ({"tokens": 100}, {"defaults": {"finetune": {"steps": 3}}}, "defaults.finetune.steps: the budget sets"),
    ({"tokens": 100}, {"stages": [{"name": "a", "target": 0.5, "finetune": {"tokens": 5}}]},
     "stages\\[0\\]: finetune.tokens conflicts with the budget, which gives this stage 100 tokens"),
    ({"tokens": 100}, {"stages": [{"name": "a", "target": 0.5, "finetune": False}]},
     "stages\\[0\\]: finetune: false conflicts with the budget"),
    ({"tokens": 0}, {}, "budget.tokens"),
])
def test_budget_conflicts_are_named(budget, overrides, message):
    with pytest.raises(ValueError, match=message):
        _budget_recipe(budget, **overrides)


def test_budget_weight_zero_agrees_with_finetune_false():
    r = _budget_recipe({"tokens": 100, "weights": [1, 0]},
                       stages=[{"name": "a", "target": 0.5}, {"name": "b", "target": 0.7, "finetune": False}])
    assert [s.finetune.tokens if s.finetune else None for s in r.resolved_stages()] == [100, None]
