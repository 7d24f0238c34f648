"""Memory estimates: parameter counts from the meta device, exact component sizes, ZeRO/offload ordering, the plan."""

from __future__ import annotations

import pytest
from transformers import LlamaConfig, OPTConfig

from sparsegpt.errors import UserError
from sparsegpt.memory import GIB, estimate, format_plan, plan_for
from sparsegpt.recipe import Recipe, load_recipe

TINY = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=256, max_position_embeddings=512, tie_word_embeddings=False)


def recipe(distributed=None, finetune=None, prune=None, dtype="float32", stages=None) -> Recipe:
    return Recipe.model_validate({
        "name": "m", "model": "x", "dtype": dtype, "data": {"calibration": "stdlib-docs"},
        "distributed": distributed or {},
        "defaults": {"prune": prune or {"nsamples": 4, "seqlen": 32},
                     "finetune": finetune or {"steps": 2, "seqlen": 32}},
        "stages": stages or [{"name": "a", "target": 0.5}, {"name": "b", "target": 0.8}]})


def test_opt125m_param_count():
    e = estimate(OPTConfig(), recipe(), 1)
    assert abs(e["params"] - 125e6) / 125e6 < 0.01
    assert e["layers"] == 12 and e["default_seqlen"] == 2048


def test_tiny_llama_components_by_hand():
    e = estimate(TINY, recipe(), 1)
    h, inter, vocab, layers = 64, 128, 256, 2
    kv = 2 * (h // 4)
    layer = h * h * 2 + 2 * h * kv + 3 * h * inter + 2 * h  # q, o, k, v, gate/up/down, two norms
    assert e["layer_params"] == layer
    assert e["params"] == layers * layer + 2 * vocab * h + h
    p = e["prune"]
    # Hessians: q/k/v share 64 cols, o 64, gate/up share 64, down 128; plus one inverse of the largest (128)
    assert p["hessians"] * GIB == 4 * (3 * h * h + inter * inter + inter * inter)
    assert p["layer_weights"] * GIB == 4 * layer + 4 * h * inter  # fp32 layer + fp32 copy of the largest linear
    assert p["activations"] * GIB == 2 * 4 * 32 * h * 4
    assert p["cpu"] * GIB == 4 * e["params"]
    f = e["finetune"]
    P = e["params"]
    assert (f["weights"] * GIB, f["grads"] * GIB, f["optimizer"] * GIB, f["master"]) == (4 * P, 4 * P, 8 * P, 0)
    prunable = layers * (2 * h * h + 2 * h * kv + 3 * h * inter)
    assert f["masks"] * GIB == prunable
    assert f["logits"] * GIB == 32 * vocab * 8 and f["teacher"] == 0


def test_offloaded_calibration_activations_move_to_cpu():
    base = estimate(TINY, recipe(), 1)["prune"]
    off = estimate(TINY, recipe(prune={"nsamples": 4, "seqlen": 32, "batch_size": 1,
                                       "offload_activations": True}), 1)["prune"]
    assert off["activations"] == base["activations"] / 4
    assert off["cpu"] - base["cpu"] == pytest.approx(base["activations"])


def test_finetune_memory_falls_with_zero_stage_and_offload():
    config = OPTConfig()
    bf16 = {"mixed_precision": "bf16"}
    devices = [estimate(config, recipe(distributed=d, dtype="bfloat16"), 8)["finetune"]["device"] for d in (
        {"zero_stage": 0, **bf16}, {"zero_stage": 2, **bf16}, {"zero_stage": 2, "offload_optimizer": True, **bf16},
        {"zero_stage": 3, **bf16}, {"zero_stage": 3, "offload_optimizer": True, **bf16},
        {"zero_stage": 3, "offload_optimizer": True, "offload_params": True, **bf16})]
    assert devices[0] > devices[1] > devices[2]
    assert devices[1] > devices[3] > devices[4] > devices[5]
    cpu = estimate(config, recipe(distributed={"zero_stage": 3, "offload_optimizer": True, **bf16},
                                  dtype="bfloat16"), 8)["finetune"]["cpu"]
    assert cpu * GIB == pytest.approx(12 * 125239296 / 8)  # fp32 master + Adam, this rank's shard


def test_checkpointing_kd_and_lora_change_what_they_should():
    base = estimate(TINY, recipe(), 1)["finetune"]
    ckpt = estimate(TINY, recipe(finetune={"steps": 2, "seqlen": 32, "gradient_checkpointing": True}), 1)["finetune"]
    kd = estimate(TINY, recipe(finetune={"steps": 2, "seqlen": 32, "kd": {"teacher": "dense"}}), 1)["finetune"]
    lora = estimate(TINY, recipe(finetune={"steps": 2, "seqlen": 32, "lora": {"r": 4, "targets": ["q_proj"]}}),
                    1)["finetune"]
    assert ckpt["activations"] < base["activations"]
    assert kd["teacher"] == base["weights"] and kd["logits"] > base["logits"]
    assert lora["optimizer"] * GIB == 2 * 4 * (2 * 4 * (64 + 64))  # Adam 2 x fp32 over r(in + out) per q_proj
    assert lora["weights"] == base["weights"]


def test_peak_stage_and_one_shot_recipes():
    e = estimate(TINY, recipe(stages=[{"name": "a", "target": 0.5, "finetune": {"steps": 1}},
                                      {"name": "b", "target": 0.6, "prune": {"nsamples": 64},
                                       "finetune": False}]), 1)
    assert e["prune"]["stage"] == "b" and e["finetune"]["stage"] == "a"
    dense = estimate(TINY, recipe(stages=[{"name": "d", "target": 0}]), 1)
    assert dense["prune"] is None and dense["finetune"]["masks"] == 0
    with pytest.raises(UserError, match="world_size must be >= 1"):
        estimate(TINY, recipe(), 0)


def test_format_plan_lists_stages_and_memory():
    r = recipe(finetune={"tokens": 640, "seqlen": 32}, distributed={"micro_batch_size": 2},
               stages=[{"name": "a", "target": 0.5}, {"name": "b", "target": 0.8, "finetune": False}])
    text = format_plan(r, estimate(TINY, r, 2))
    assert "0  a      0.5     sparsegpt/uniform 4x32  5 steps" in text  # 640 / (32 x 2 x 1 x 2)
    assert "one-shot" in text and "peak at a" in text and "perplexity(stdlib-docs)" in text
    assert "2 x 1 accum x 2 processes = 4 sequences per step" in text


def test_plan_for_reads_only_the_config(tmp_path):
    TINY.save_pretrained(tmp_path)  # config.json only, no weights
    r = recipe().model_copy(update={"model": str(tmp_path)})
    assert "peak at" in plan_for(r, world_size=1)
    offline = recipe().model_copy(update={"model": "nobody/no-such-model"})
    with pytest.raises(UserError, match="cannot read the config of 'nobody/no-such-model'"):
        plan_for(offline)


def test_opt13b_recipe_header_states_this_estimate():
    # facebook/opt-13b's published config.json
    config = OPTConfig(hidden_size=5120, num_hidden_layers=40, num_attention_heads=40, ffn_dim=20480,
                       word_embed_proj_dim=5120, vocab_size=50272, max_position_embeddings=2048, dtype="float16")
    path = "recipes/opt13b_90.yaml"
    e = estimate(config, load_recipe(path), 8)
    header = open(path).read().split("\nname:")[0]
    assert f"{e['prune']['device']:.1f} GiB on the GPU, {e['prune']['cpu']:.1f} GiB CPU" in header
    assert f"{e['finetune']['device']:.1f} GiB on the GPU" in header
