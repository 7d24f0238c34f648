"""Sparse LoRA: adapters on pruned linears train, then merge as W + keep ⊙ delta with the mask's exact zeros."""

import copy
from types import SimpleNamespace

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from sparsegpt.core.errors import UserError
from sparsegpt.heal.lora import LoraSettings, add_sparse_lora, merge_sparse_lora

torch.set_num_threads(1)
VOCAB = 96
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def pruned_llama(sparsity: float = 0.7, dtype=torch.float32) -> tuple[LlamaForCausalLM, dict[str, torch.Tensor]]:
    """Tiny random Llama whose decoder linears are magnitude-pruned; returns it with its masks (True = pruned)."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                         max_position_embeddings=64)).to(dtype)
    masks = {}
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in LINEARS:
            w = module.weight.detach()
            k = int(sparsity * w.numel())
            mask = torch.zeros(w.numel(), dtype=torch.bool)
            mask[w.abs().flatten().argsort()[:k]] = True
            masks[name] = mask.view_as(w)
            w.masked_fill_(masks[name], 0)
    return model, masks


def train_a_few_steps(model, steps: int = 5) -> None:
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()


def lora_deltas(peft_model, alpha: float, r: int) -> dict[str, torch.Tensor]:
    """By hand, in float64: plain module name -> (alpha / r) · B @ A."""
    from peft.tuners.lora import LoraLayer

    return {name: (alpha / r) * (m.lora_B["default"].weight.double() @ m.lora_A["default"].weight.double())
            for name, m in peft_model.get_base_model().named_modules() if isinstance(m, LoraLayer)}


def with_weights(model, weights: dict[str, torch.Tensor]):
    """A copy of `model` whose named linears carry the given weights."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for name, w in weights.items():
            out.get_submodule(name).weight.copy_(w)
    return out


def test_merge_keeps_zeros_and_matches_reference_after_training():
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    model, masks = pruned_llama()
    base = copy.deepcopy(model)
    peft_model = add_sparse_lora(model, LoraSettings(r=4, alpha=16))
    assert isinstance(peft_model, PeftModel)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    train_a_few_steps(peft_model)

    deltas = lora_deltas(peft_model, alpha=16, r=4)
    assert set(deltas) == set(masks)  # default targets = every pruned decoder linear
    assert all((d[masks[n]] != 0).any() for n, d in deltas.items())  # training produced a dense delta
    base_w = {n: base.get_submodule(n).weight.double() for n in masks}
    dense = with_weights(base, {n: base_w[n] + deltas[n] for n in masks})
    sparse = with_weights(base, {n: base_w[n] + (~masks[n]) * deltas[n] for n in masks})
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids).logits, dense(ids).logits, rtol=1e-5, atol=1e-5)  # same delta
        merged = merge_sparse_lora(peft_model, masks)
        merged_logits = merged(ids).logits
    assert type(merged) is LlamaForCausalLM
    assert not any(isinstance(m, LoraLayer) for m in merged.modules())
    for name, mask in masks.items():
        w = merged.get_submodule(name).weight
        assert torch.equal(w == 0, mask), name  # zeros equal the mask bit for bit
        torch.testing.assert_close(w.double(), sparse.get_submodule(name).weight.double(), rtol=0, atol=1e-6)
    torch.testing.assert_close(merged_logits, sparse(ids).logits, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(merged_logits, dense(ids).logits, atol=1e-4)  # the pruned-position delta was dropped


def test_merge_bf16_with_maskset_like_object():
    from peft.tuners.lora import LoraLayer

    model, masks = pruned_llama(dtype=torch.bfloat16)
    peft_model = add_sparse_lora(model, LoraSettings(r=2, alpha=4, targets=["q_proj", "mlp.down_proj"]))
    with torch.no_grad():
        for m in peft_model.modules():
            if isinstance(m, LoraLayer):
                m.lora_B["default"].weight.normal_()
    names = {n for n, m in peft_model.get_base_model().named_modules() if isinstance(m, LoraLayer)}
    assert names == {f"model.layers.{i}.{s}" for i in (0, 1) for s in ("self_attn.q_proj", "mlp.down_proj")}
    deltas = lora_deltas(peft_model, alpha=4, r=2)
    before = {n: peft_model.get_base_model().get_submodule(n).base_layer.weight.double().clone() for n in names}
    merged = merge_sparse_lora(peft_model, SimpleNamespace(masks=masks))
    for name in names:
        w = merged.get_submodule(name).weight
        assert w.dtype == torch.bfloat16 and torch.equal(w == 0, masks[name])
        expected = (before[name] + (~masks[name]) * deltas[name]).to(torch.bfloat16)
        torch.testing.assert_close(w, expected, rtol=1e-2, atol=1e-2)


def test_lora_settings_validation():
    for bad, message in [({"r": 0}, "rank r must be > 0"), ({"r": 4, "alpha": 0}, "alpha must be >= 1"),
                         ({"r": 4, "dropout": 1.0}, r"dropout must be in \[0, 1\)"),
                         ({"r": 4, "dropout": -0.1}, r"dropout must be in \[0, 1\)")]:
        with pytest.raises(UserError, match=message):
            LoraSettings(**bad)


def test_add_sparse_lora_errors():
    model, _ = pruned_llama()
    with pytest.raises(UserError, match="matches LoRA targets"):
        add_sparse_lora(model, LoraSettings(r=2, targets=["lm_head"]))  # outside the decoder layers
    with pytest.raises(UserError, match=r"model.layers.0.self_attn is a LlamaAttention, not an nn.Linear.*'q_proj'"):
        add_sparse_lora(model, LoraSettings(r=2, targets=["self_attn"]))


@pytest.mark.parametrize("targets", [None, ["c_attn"]])
def test_gpt2_conv1d_target_is_rejected(targets):
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=32))
    with pytest.raises(UserError, match=r"transformer.h.0.attn.c_attn is a Conv1D, not an nn.Linear.*without LoRA"):
        add_sparse_lora(gpt2, LoraSettings(r=2, targets=targets))


def test_merge_errors():
    model, masks = pruned_llama()
    with pytest.raises(TypeError, match="needs the PeftModel"):
        merge_sparse_lora(model, masks)
    peft_model = add_sparse_lora(model, LoraSettings(r=2, targets=["q_proj"]))
    missing = {n: m for n, m in masks.items() if n != "model.layers.1.self_attn.q_proj"}
    with pytest.raises(UserError, match="model.layers.1.self_attn.q_proj has no mask"):
        merge_sparse_lora(peft_model, missing)
    with pytest.raises(UserError, match="mask for model.layers.0.self_attn.q_proj is"):
        merge_sparse_lora(peft_model, {**masks, "model.layers.0.self_attn.q_proj": masks["model.layers.0.mlp.up_proj"]})
    stray = {**masks, "model.layers.0.self_attn.q_proj": torch.ones_like(masks["model.layers.0.self_attn.q_proj"])}
    with pytest.raises(UserError, match=r"model.layers.0.self_attn.q_proj has \d+ non-zero weights at pruned"):
        merge_sparse_lora(peft_model, stray)
