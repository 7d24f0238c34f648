"""Every decoder family of the table beyond the original five, on tiny offline configs: each layer replays exactly
what the model's own forward gives it (mixed sliding/full attention, per-layer rope), pruning with SparseGPT and
Wanda (unstructured and 2:4) keeps the propagation invariant, and two fine-tuning steps keep the mask exact and
the result reloads in plain transformers. MoE families are pruned expert by expert (tests/test_moe.py has the
per-expert Hessians)."""

from __future__ import annotations

import math

import pytest
import torch
import transformers as T
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from test_sequential import out_hidden, record_layer_inputs

from sparsegpt.core.architectures import ExpertLinear, decoder_layers, family_of, prunable_linears, weight_as_linear
from sparsegpt.core.masks import MaskSet
from sparsegpt.heal.config import FinetuneConfig
from sparsegpt.heal.finetune import finetune
from sparsegpt.prune.capture import capture_layer_inputs, layerwise_hidden_states
from sparsegpt.prune.sequential import PruneConfig, prune_model
from sparsegpt.storage.models import save_model

VOCAB, ROWS, SEQLEN, BATCH, WINDOW = 512, 6, 16, 4, 4  # sliding window 4 < 16 tokens: the window matters
BASE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=1, max_position_embeddings=64)
MOE = dict(num_experts=4, num_experts_per_tok=2, output_router_logits=True, router_aux_loss_coef=0.02)
SLIDING_FULL = ["sliding_attention", "full_attention"]

CONFIGS = {  # model_type -> a tiny config; the mixed ones give their two layers different attention
    "mistral": lambda: T.MistralConfig(**BASE, sliding_window=WINDOW),
    "qwen2": lambda: T.Qwen2Config(**BASE, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
    "qwen3": lambda: T.Qwen3Config(**BASE, head_dim=8),
    "gemma": lambda: T.GemmaConfig(**BASE, head_dim=8),
    "gemma2": lambda: T.Gemma2Config(**BASE, head_dim=8, sliding_window=WINDOW, layer_types=SLIDING_FULL),
    "gemma3_text": lambda: T.Gemma3TextConfig(**BASE, head_dim=8, sliding_window=WINDOW, layer_types=SLIDING_FULL),
    "phi3": lambda: T.Phi3Config(**BASE, sliding_window=WINDOW),
    "phi": lambda: T.PhiConfig(**BASE),
    "falcon": lambda: T.FalconConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
                                     pad_token_id=0, bos_token_id=1, eos_token_id=1),
    "olmo": lambda: T.OlmoConfig(**BASE),
    "olmo2": lambda: T.Olmo2Config(**BASE),
    "stablelm": lambda: T.StableLmConfig(**BASE),
    "starcoder2": lambda: T.Starcoder2Config(**BASE),
    "granite": lambda: T.GraniteConfig(**BASE),
    "cohere": lambda: T.CohereConfig(**BASE),
    "mixtral": lambda: T.MixtralConfig(**BASE, **{k: v for k, v in MOE.items() if k != "num_experts"},
                                       num_local_experts=4),
    "qwen2_moe": lambda: T.Qwen2MoeConfig(**BASE, **MOE, moe_intermediate_size=16, shared_expert_intermediate_size=32),
    "qwen3_moe": lambda: T.Qwen3MoeConfig(**BASE, **MOE, moe_intermediate_size=16),
    "olmoe": lambda: T.OlmoeConfig(**BASE, **MOE),
}
MIXED = ("qwen2", "gemma2", "gemma3_text")  # layers of different attention types (and rope, for gemma3)
MOE_KINDS = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")


def tiny_model(kind: str, seed: int = 0) -> T.PreTrainedModel:
    """A tiny random float32 causal LM of `kind` (a CONFIGS key), eval mode."""
    config = CONFIGS[kind]()
    torch.manual_seed(seed)
    return T.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def calib(seed: int = 1) -> torch.Tensor:
    return torch.randint(2, VOCAB, (ROWS, SEQLEN), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    monkeypatch.setenv("SPARSEGPT_NO_PROGRESS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_every_kind_is_in_the_family_table():
    for kind in CONFIGS:
        model = tiny_model(kind)
        assert kind in family_of(model).model_types
        experts = [n for n, m in prunable_linears(model).items() if isinstance(m, ExpertLinear)]
        assert bool(experts) == (kind in MOE_KINDS), kind
        assert not any(".gate." in n or n.endswith(".gate") or "shared_expert" in n for n in prunable_linears(model))


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_shared_input_groups_read_one_input(kind):
    model = tiny_model(kind)
    layer = decoder_layers(model)[1]
    seen = {}
    names = {n for n, _ in layer.named_modules()}
    for group in family_of(model).shared_inputs:
        for name in group:
            if name in names:
                layer.get_submodule(name).register_forward_pre_hook(lambda m, a, n=name: seen.__setitem__(n, a[0]))
    with torch.no_grad():
        model(calib()[:2])
    for group in family_of(model).shared_inputs:
        present = [n for n in group if n in names]
        assert set(present) <= set(seen)
        for name in present[1:]:
            assert torch.equal(seen[name], seen[present[0]]), (kind, name)


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_layerwise_hidden_states_equal_the_models_forward(kind):
    model, ids = tiny_model(kind), calib()
    hidden = torch.cat(layerwise_hidden_states(model, ids, device="cpu", batch_size=BATCH))
    with torch.no_grad():
        expected = model.base_model(ids).last_hidden_state
    torch.testing.assert_close(hidden, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", MIXED)
def test_mixed_layers_each_get_their_own_arguments(kind):
    """Layer 1 (full attention; Gemma-3: global rope) replayed with layer 0's (sliding) arguments computes
    something else: reusing one layer's arguments for all, as the driver used to, would be wrong here."""
    model, ids = tiny_model(kind), calib()
    assert len(set(model.config.layer_types)) == 2
    batch = capture_layer_inputs(model, decoder_layers(model), ids[:2], batch_size=2, store_device="cpu")[0]
    layer = decoder_layers(model)[1]
    with torch.no_grad():
        own = out_hidden(layer(batch.hidden, *batch.inputs[1][0], **batch.inputs[1][1]))
        borrowed = out_hidden(layer(batch.hidden, *batch.inputs[0][0], **batch.inputs[0][1]))
    assert not torch.allclose(own, borrowed, atol=1e-4)
    if kind == "gemma3_text":  # local and global rope differ too
        cos0, cos1 = batch.inputs[0][1]["position_embeddings"][0], batch.inputs[1][1]["position_embeddings"][0]
        assert not torch.allclose(cos0, cos1)


def _check_propagation(model, log, ids) -> None:
    """Layer l+1 was calibrated on pruned layer l's outputs, and those are what the pruned model computes."""
    layers, nbatches = decoder_layers(model), math.ceil(ROWS / BATCH)
    with torch.no_grad():
        for i in range(len(layers) - 1):
            for b in range(nbatches):
                args, kwargs = log[i][b]
                torch.testing.assert_close(out_hidden(layers[i](*args, **kwargs)), log[i + 1][b][0][0])
        fresh, handles = record_layer_inputs(model)
        for batch in ids.split(BATCH):
            model(batch)
        for h in handles:
            h.remove()
    for i in range(len(layers)):
        for b in range(nbatches):
            torch.testing.assert_close(fresh[i][b][0][0], log[i][b][0][0])


@pytest.mark.parametrize("method, nm", [("sparsegpt", 0), ("sparsegpt", 4), ("wanda", 0), ("wanda", 4)],
                         ids=["sparsegpt", "sparsegpt-2:4", "wanda", "wanda-2:4"])
@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_prune_keeps_the_propagation_invariant(kind, method, nm):
    model, ids = tiny_model(kind), calib()
    cfg = PruneConfig(method=method, sparsity=0.5, prune_n=nm // 2, prune_m=nm, batch_size=BATCH, blocksize=16)
    log, handles = record_layer_inputs(model)
    result = prune_model(model, ids, cfg)
    for h in handles:
        h.remove()
    matrices = prunable_linears(model)
    assert set(result.masks.masks) == set(matrices) == {s["name"] for s in result.stats}
    for name, mask in result.masks.masks.items():
        assert mask.float().mean().item() == 0.5, name
        assert (weight_as_linear(matrices[name])[mask] == 0).all(), name
        if nm:
            assert (mask.reshape(mask.shape[0], -1, 4).sum(-1) == 2).all(), name
    assert all(s["tokens"] > 0 or s["expert"] is not None for s in result.stats)
    _check_propagation(model, log, ids)


@pytest.fixture
def accelerator():
    """A single-process Accelerator; accelerate's process-wide state is reset afterwards."""
    yield Accelerator()
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_finetune_two_steps_keeps_the_mask_and_reloads(kind, accelerator, tmp_path):
    model, ids = tiny_model(kind), calib()
    masks = prune_model(model, ids, PruneConfig(prune_n=2, prune_m=4, batch_size=BATCH)).masks
    before = {n: weight_as_linear(m).clone() for n, m in masks.modules(model).items()}
    if kind in MOE_KINDS:  # the router's load-balancing loss is part of the training loss
        with torch.no_grad():
            out = model(input_ids=ids[:2], labels=ids[:2])
        assert out.aux_loss is not None and out.aux_loss > 0
    result = finetune(model, ids, masks, FinetuneConfig(steps=2, lr=1e-3, micro_batch_size=2, seed=0),
                      accelerator=accelerator)
    assert len(result.losses) == 2 and all(math.isfinite(x) for x in result.losses)
    model = accelerator.unwrap_model(model).eval()
    masks.verify(model)  # UserError if a pruned weight revived
    for name, module in masks.modules(model).items():
        assert torch.equal(weight_as_linear(module) == 0, masks.masks[name]), name  # zeros = mask, bit for bit
    changed = [n for n, m in masks.modules(model).items() if not torch.equal(weight_as_linear(m), before[n])]
    assert len(changed) == len(before), sorted(set(before) - set(changed))  # every matrix trained, experts too
    masks.save(tmp_path / "mask.safetensors")
    save_model(model, None, tmp_path / "model",
               extra_files={"mask.safetensors": (tmp_path / "mask.safetensors").read_bytes()})
    reloaded = T.AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    state = model.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in reloaded.state_dict().items())
    MaskSet.load(tmp_path / "model" / "mask.safetensors").verify(reloaded)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids[:2]).logits, model(ids[:2]).logits, rtol=0, atol=0)
