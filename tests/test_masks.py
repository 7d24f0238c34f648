"""MaskSet: exact zeros, 1-bit save/load, apply/verify, sparsity against float64 counts, gradient hooks, the
bit packing and the keep masks the hooks and the enforcer share."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers as T
from safetensors import safe_open
from transformers.pytorch_utils import Conv1D

from sparsegpt.core.architectures import prunable_linears, weight_as_linear
from sparsegpt.core.errors import UserError
from sparsegpt.core.masks import MaskSet, keep_mask_of, mask_in_param_layout, pack_bits, unpack_bits
from sparsegpt.heal.enforce import MaskEnforcer


def _pruned(model, fraction: float = 0.6, seed: int = 0):
    """Zero a random `fraction` of every prunable linear (in its (out, in) view) and return the model."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in prunable_linears(model).values():
            w = weight_as_linear(module)
            w.masked_fill_(torch.rand(w.shape, generator=gen) < fraction, 0)
    return model


def _as_linear(module, tensor):
    """A weight-shaped tensor in (out, in) layout (GPT-2 Conv1D stores (in, out))."""
    return tensor.t() if isinstance(module, Conv1D) else tensor


@pytest.fixture(params=["llama", "gpt2"])
def pruned_model(request, make_tiny_model):
    return _pruned(make_tiny_model(request.param))


def test_from_model_is_the_exact_zeros_in_out_in_layout(pruned_model):
    masks = MaskSet.from_model(pruned_model)
    linears = prunable_linears(pruned_model)
    assert set(masks.masks) == set(linears)
    for name, module in linears.items():
        w = weight_as_linear(module)
        assert masks.masks[name].dtype == torch.bool and masks.masks[name].shape == w.shape
        assert torch.equal(masks.masks[name], w == 0)


def test_sparsity_and_per_module_match_float64_counts(pruned_model):
    masks = MaskSet.from_model(pruned_model)
    weights = [weight_as_linear(m).double() for m in prunable_linears(pruned_model).values()]
    expected = sum(float((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert masks.sparsity() == pytest.approx(expected, abs=1e-15)
    for (name, value), w in zip(masks.per_module().items(), weights):
        assert value == pytest.approx(float((w == 0).double().mean()), abs=1e-7), name


def test_save_load_roundtrip_is_bit_exact_and_packed(tmp_path):
    gen = torch.Generator().manual_seed(3)
    masks = MaskSet({"a.b": torch.rand(7, 13, generator=gen) < 0.5, "c": torch.rand(64, 3, generator=gen) < 0.9})
    path = tmp_path / "mask.safetensors"
    masks.save(path)
    loaded = MaskSet.load(path)
    assert loaded.masks.keys() == masks.masks.keys()
    for name in masks.masks:
        assert torch.equal(loaded.masks[name], masks.masks[name])
    with safe_open(str(path), framework="np") as f:
        assert f.get_tensor("a.b").dtype == np.uint8 and f.get_tensor("a.b").size == (7 * 13 + 7) // 8
        assert json.loads(f.metadata()["shapes"]) == {"a.b": [7, 13], "c": [64, 3]}
    assert [p.name for p in tmp_path.iterdir()] == ["mask.safetensors"]  # no temp file left behind


def test_masks_are_held_packed_and_lookups_are_fresh(tmp_path):
    """Every rank of a job holds a MaskSet: it must cost 1 bit per weight in memory too, loaded or built."""
    gen = torch.Generator().manual_seed(4)
    dense = {"w1": torch.rand(300, 257, generator=gen) < 0.8, "w2": torch.rand(5, 3, generator=gen) < 0.5}
    built = MaskSet(dense)
    built.save(tmp_path / "m.safetensors")
    loaded = MaskSet.load(tmp_path / "m.safetensors")
    for masks in (built, loaded):
        assert masks.masks.nbytes() == (300 * 257 + 7) // 8 + (15 + 7) // 8
        assert masks.sparsity() == sum(int(m.sum()) for m in dense.values()) / (300 * 257 + 15)
        assert masks.per_module()["w2"] == float(dense["w2"].double().mean())
        got = masks.masks["w1"]
        assert torch.equal(got, dense["w1"])
        got.fill_(False)  # a lookup is the caller's own tensor
        assert torch.equal(masks.masks["w1"], dense["w1"])


def test_load_rejects_a_truncated_mask(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "mask.safetensors"
    MaskSet({"a": torch.ones(4, 8, dtype=torch.bool)}).save(path)
    with safe_open(str(path), framework="pt") as f:
        meta, packed = f.metadata(), f.get_tensor("a")
    save_file({"a": packed[:-1]}, str(path), metadata=meta)  # one byte short: 24 of 32 bits
    with pytest.raises(UserError, match="truncated or corrupt"):
        MaskSet.load(path)


def test_load_rejects_missing_and_foreign_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        MaskSet.load(tmp_path / "nope.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(UserError, match="not a sparsegpt mask file"):
        MaskSet.load(tmp_path / "other.safetensors")


def test_apply_zeroes_and_verify_catches_a_revived_weight(pruned_model, make_tiny_model):
    masks = MaskSet.from_model(pruned_model)
    fresh = make_tiny_model(pruned_model.config.model_type)  # same architecture, dense
    masks.apply(fresh)
    per_linear = masks.verify(fresh)
    assert per_linear == pytest.approx(masks.per_module())
    name, mask = next(iter(masks.masks.items()))
    row, col = mask.nonzero()[0].tolist()
    with torch.no_grad():
        weight_as_linear(fresh.get_submodule(name))[row, col] = 0.5
    with pytest.raises(UserError, match=f"^1 pruned weights of {name} are non-zero"):
        masks.verify(fresh)


def test_check_shapes_names_the_mismatch(make_tiny_model):
    llama = make_tiny_model("llama")
    masks = MaskSet.from_model(_pruned(llama))
    name = next(iter(masks.masks))
    wrong = MaskSet({**masks.masks, name: torch.zeros(3, 5, dtype=torch.bool)})
    with pytest.raises(UserError, match=f"mask for {name} is \\(3, 5\\)"):
        wrong.check_shapes(llama)
    with pytest.raises(UserError, match="not in the model"):
        MaskSet({"model.layers.9.mlp.up_proj": torch.zeros(2, 2, dtype=torch.bool)}).check_shapes(llama)
    with pytest.raises(UserError, match="2-D bool"):
        MaskSet({"x": torch.zeros(2, 2)})


def test_grad_hooks_zero_masked_gradients_before_accumulation(pruned_model):
    masks = MaskSet.from_model(pruned_model)
    ids = torch.randint(0, pruned_model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    handles = masks.grad_hooks(pruned_model)
    for _ in range(2):  # the second backward accumulates onto .grad
        pruned_model(input_ids=ids, labels=ids).loss.backward()
    for name, module in masks.modules(pruned_model).items():
        grad = _as_linear(module, module.weight.grad)
        assert torch.count_nonzero(grad[masks.masks[name]]) == 0, name
        assert torch.count_nonzero(grad[~masks.masks[name]]) > 0, name
    for handle in handles:
        handle.remove()
    pruned_model.zero_grad()
    pruned_model(input_ids=ids, labels=ids).loss.backward()  # without hooks the masked gradients are dense
    assert all(torch.count_nonzero(_as_linear(module, module.weight.grad)[masks.masks[name]]) > 0
               for name, module in masks.modules(pruned_model).items())


def test_grad_hooks_skip_frozen_weights(make_tiny_model):
    model = _pruned(make_tiny_model("llama"))
    masks = MaskSet.from_model(model)
    model.requires_grad_(False)
    assert masks.grad_hooks(model) == []


def _tiny_mixtral():
    torch.manual_seed(0)
    return T.AutoModelForCausalLM.from_config(T.MixtralConfig(
        hidden_size=32, intermediate_size=16, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=64, num_local_experts=3, num_experts_per_tok=2))


def test_expert_masks_stack_into_the_fused_parameter_layout():
    model = _pruned(_tiny_mixtral())
    masks = MaskSet.from_model(model)
    name = "model.layers.0.mlp.experts.gate_up_proj.1"
    assert masks.masks[name].shape == (32, 32)  # (2 x intermediate, hidden): one expert's (out, in)
    fused = model.model.layers[0].mlp.experts.gate_up_proj
    param, stacked = masks.param_masks(model)["model.layers.0.mlp.experts.gate_up_proj"]
    assert param is fused and torch.equal(stacked, fused.detach() == 0)
    one = mask_in_param_layout(masks.modules(model)[name], masks.masks[name])
    assert one.shape == fused.shape and torch.equal(one[1], masks.masks[name]) and not one[[0, 2]].any()
    partial = MaskSet({n: m for n, m in masks.masks.items() if not n.endswith("gate_up_proj.2")})
    assert not partial.param_masks(model)["model.layers.0.mlp.experts.gate_up_proj"][1][2].any()  # expert 2 kept
    with pytest.raises(UserError, match="mask for model.layers.0.mlp.experts.down_proj.0 is \\(16, 32\\) but the "
                                        "weight is \\(out, in\\) = \\(32, 16\\)"):
        MaskSet({**masks.masks, "model.layers.0.mlp.experts.down_proj.0": torch.zeros(16, 32, dtype=torch.bool)}
                ).check_shapes(model)
    with pytest.raises(UserError, match="not in the model"):
        MaskSet({"model.layers.0.mlp.experts.down_proj.3": torch.zeros(32, 16, dtype=torch.bool)}).check_shapes(model)


def test_grad_hooks_cover_fused_expert_parameters():
    model = _pruned(_tiny_mixtral())
    masks = MaskSet.from_model(model)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    handles = masks.grad_hooks(model)
    assert len(handles) == len(masks.param_masks(model)) < len(masks.masks)  # one hook per parameter
    model(input_ids=ids, labels=ids).loss.backward()
    for param, mask in masks.param_masks(model).values():
        assert torch.count_nonzero(param.grad[mask]) == 0 and torch.count_nonzero(param.grad[~mask]) > 0
    for handle in handles:
        handle.remove()


@pytest.mark.parametrize("numel", [1, 7, 8, 9, 1000])
def test_pack_bits_is_np_packbits_and_unpacks_exactly(numel):
    mask = torch.rand(numel, generator=torch.Generator().manual_seed(numel)) < 0.5
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and np.array_equal(packed.numpy(), np.packbits(mask.numpy()))
    assert torch.equal(unpack_bits(packed, numel), mask)


def test_enforcer_shares_the_hooks_keep_one_per_parameter(pruned_model):
    masks = MaskSet.from_model(pruned_model)
    optimizer = torch.optim.AdamW(pruned_model.parameters())
    one_keep_each = sum((p.numel() + 7) // 8 for p, _ in masks.param_masks(pruned_model).values())  # packed bits
    alone = MaskEnforcer(pruned_model, masks, optimizer)
    assert alone.held_bytes() == one_keep_each
    handles = masks.grad_hooks(pruned_model)
    shared = MaskEnforcer(pruned_model, masks, optimizer)
    assert all(slot.mask is keep_mask_of(slot.param) for slot in shared.slots)
    assert shared.held_bytes() == one_keep_each  # not twice: hook and enforcer hold the same keep
    for handle in handles:
        handle.remove()
    assert all(keep_mask_of(slot.param) is None for slot in shared.slots)
