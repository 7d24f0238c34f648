"""Per-family table: layer locations, prunable linears, shared inputs, Conv1D layout — on tiny random models."""

import pytest
import torch
import transformers as T
from torch import nn

from sparsegpt.core.architectures import (
    ExpertLinear,
    decoder_layers,
    family_of,
    final_modules,
    linear_by_name,
    linear_shape,
    lm_head,
    prunable_linears,
    set_weight_from_linear,
    weight_as_linear,
)
from sparsegpt.core.errors import UserError

FIVE = ("opt", "bloom", "llama", "gpt2", "gpt_neox")
LLAMA_LIKE = {"mistral": T.MistralConfig, "qwen2": T.Qwen2Config}
PER_LAYER = {
    "opt": {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"},
    "bloom": {"self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"},
    "llama": {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"},
    "gpt2": {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"},
    "gpt_neox": {"attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"},
}


@pytest.fixture
def any_model(make_tiny_model):
    """any_model(kind): conftest's tiny model of a family, or a tiny llama-like (mistral, qwen2)."""
    def make(kind):
        if kind in LLAMA_LIKE:
            return T.AutoModelForCausalLM.from_config(LLAMA_LIKE[kind](
                hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=64)).eval()
        return make_tiny_model(kind)

    return make


@pytest.mark.parametrize("kind", FIVE + tuple(LLAMA_LIKE))
def test_family_layers_and_prunable_linears(any_model, kind):
    model = any_model(kind)
    family = family_of(model)
    assert decoder_layers(model) is model.get_submodule(family.layers_path)
    assert len(decoder_layers(model)) == 2
    names = set(prunable_linears(model))
    expected = PER_LAYER["llama" if kind in LLAMA_LIKE else kind]
    assert names == {f"{family.layers_path}.{i}.{n}" for i in range(2) for n in expected}
    assert lm_head(model) is model.get_output_embeddings()
    assert all(isinstance(m, nn.Module) for m in final_modules(model)) and final_modules(model)


@pytest.mark.parametrize("kind", FIVE)
def test_shared_input_groups_really_read_one_input(make_tiny_model, kind):
    model = make_tiny_model(kind)
    family = family_of(model)
    layer = decoder_layers(model)[1]
    seen = {}
    for group in family.shared_inputs:
        for name in group:
            layer.get_submodule(name).register_forward_pre_hook(lambda m, a, name=name: seen.__setitem__(name, a[0]))
    model(torch.randint(0, model.config.vocab_size, (2, 7)))
    for group in family.shared_inputs:
        assert set(group) <= set(seen), f"{group} are not all linears of {kind}"
        for name in group[1:]:
            assert seen[name] is seen[group[0]] or torch.equal(seen[name], seen[group[0]])


def test_unknown_family_lists_supported():
    model = T.AutoModelForCausalLM.from_config(T.GPTJConfig(n_embd=32, n_layer=1, n_head=4, vocab_size=64,
                                                            rotary_dim=4))
    with pytest.raises(UserError, match=r"'gptj' is not supported \(nearest supported: 'gpt2'\).*opt.*bloom.*llama"
                                        r".*gpt2.*gpt_neox.*mixtral.*qwen2_moe") as error:
        family_of(model)
    assert "\n" not in str(error.value)


def test_include_exclude_regex(make_tiny_model):
    model = make_tiny_model("llama")
    mlp = prunable_linears(model, include=r"mlp\.")
    assert set(mlp) == {f"model.layers.{i}.mlp.{n}_proj" for i in range(2) for n in ("gate", "up", "down")}
    no_down = prunable_linears(model, include=r"\.1\.", exclude="down_proj|o_proj")
    assert set(no_down) == {f"model.layers.1.{n}" for n in ("self_attn.q_proj", "self_attn.k_proj",
                                                             "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")}
    with pytest.raises(UserError, match="--include '\\(' is not a valid regular expression"):
        prunable_linears(model, include="(")


def test_bare_module_names_are_relative(make_tiny_model):
    layer = decoder_layers(make_tiny_model("gpt2"))[0]
    assert set(prunable_linears(layer)) == PER_LAYER["gpt2"]


def test_conv1d_weight_is_seen_as_out_in(make_tiny_model):
    model = make_tiny_model("gpt2")
    conv = model.get_submodule("transformer.h.0.mlp.c_fc")  # Conv1D(nf=128, nx=64): stored (64, 128)
    w = weight_as_linear(conv)
    assert w.shape == (128, 64)
    x = torch.randn(3, 64)
    torch.testing.assert_close(nn.functional.linear(x, w, conv.bias), conv(x))
    new = torch.randn(128, 64, dtype=torch.float64)
    set_weight_from_linear(conv, new)
    assert conv.weight.dtype == torch.float32
    torch.testing.assert_close(conv.weight, new.t().float())
    with pytest.raises(UserError, match=r"\(64, 128\) does not match .* \(128, 64\)"):
        set_weight_from_linear(conv, new.t())


def test_linear_weight_roundtrip(make_tiny_model):
    lin = decoder_layers(make_tiny_model("opt"))[0].fc1
    new = torch.randn(128, 64)
    set_weight_from_linear(lin, new)
    assert torch.equal(lin.weight, new) and torch.equal(weight_as_linear(lin), new)


class _FusedExperts(nn.Module):
    """The transformers 5.x fused-experts layout: 3-D (experts, out, in) parameters, or (experts, in, out)."""

    def __init__(self, transposed: bool):
        super().__init__()
        self.is_transposed = transposed
        shape = (3, 8, 16) if transposed else (3, 16, 8)  # 3 experts, in = 8, out = 16
        self.up_proj = nn.Parameter(torch.randn(shape))
        self.down_proj = nn.Parameter(torch.randn(shape[0], shape[2], shape[1]))


@pytest.mark.parametrize("transposed", [False, True])
def test_fused_experts_are_one_linear_per_expert(transposed):
    block = nn.Module()
    block.experts = _FusedExperts(transposed)
    block.gate = nn.Linear(8, 3, bias=False)
    matrices = prunable_linears(block)
    assert list(matrices) == [*(f"experts.up_proj.{e}" for e in range(3)),
                              *(f"experts.down_proj.{e}" for e in range(3)), "gate"]
    up = matrices["experts.up_proj.1"]
    assert isinstance(up, ExpertLinear) and up.weight is block.experts.up_proj and linear_shape(up) == (16, 8)
    x = torch.randn(5, 8)
    stored = block.experts.up_proj[1]
    torch.testing.assert_close(x @ weight_as_linear(up).t(), x @ stored if transposed else x @ stored.t())
    new = torch.randn(16, 8)
    set_weight_from_linear(up, new)
    assert torch.equal(block.experts.up_proj[1], new.t() if transposed else new)
    assert torch.equal(block.experts.up_proj[0] != 0, torch.ones_like(block.experts.up_proj[0], dtype=torch.bool))
    assert isinstance(linear_by_name(block, "experts.down_proj.2"), ExpertLinear)
    assert linear_by_name(block, "experts.down_proj.3") is None and linear_by_name(block, "experts.nope.0") is None
    assert linear_by_name(block, "gate") is block.gate


def test_moe_models_list_experts_and_leave_routers_and_shared_experts_out():
    model = T.AutoModelForCausalLM.from_config(T.Qwen2MoeConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=64, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
        shared_expert_intermediate_size=32)).eval()
    default = set(prunable_linears(model))
    experts = {f"model.layers.0.mlp.experts.{p}.{e}" for p in ("gate_up_proj", "down_proj") for e in range(4)}
    attention = {f"model.layers.0.self_attn.{n}_proj" for n in "qkvo"}
    assert default == experts | attention
    every = set(prunable_linears(model, routers=True, shared_experts=True))
    assert every - default == {"model.layers.0.mlp.gate", "model.layers.0.mlp.shared_expert_gate",
                               *(f"model.layers.0.mlp.shared_expert.{n}_proj" for n in ("gate", "up", "down"))}
    router = prunable_linears(model, routers=True)["model.layers.0.mlp.gate"]
    assert weight_as_linear(router).shape == (4, 32)  # a TopKRouter: a 2-D weight applied as F.linear
