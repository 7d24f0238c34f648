"""Calibration driver on tiny random models of all five families: exact Hessians, propagation through the
pruned layers, shared vs per-linear Hessians, base masks, OWL, N:M, and layer-by-layer hidden states."""

import math

import pytest
import torch
from test_architectures import FIVE, VOCAB, tiny_model

from sparsegpt import allocation
from sparsegpt.architectures import decoder_layers, prunable_linears, weight_as_linear
from sparsegpt.errors import UserError
from sparsegpt.masks import MaskSet
from sparsegpt.sequential import PruneConfig, layerwise_hidden_states, prune_model
from sparsegpt.solver import prune_matrix

torch.set_num_threads(1)
NSAMPLES, SEQLEN, BATCH = 6, 12, 4  # an uneven last batch on purpose


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("SPARSEGPT_NO_PROGRESS", "1")


def calib(seed=1):
    return torch.randint(0, VOCAB, (NSAMPLES, SEQLEN), generator=torch.Generator().manual_seed(seed))


def record_layer_inputs(model):
    """Pre-hooks that keep every (args, kwargs) each decoder layer is called with; returns (log, handles)."""
    log = {i: [] for i in range(len(decoder_layers(model)))}
    handles = [layer.register_forward_pre_hook(lambda m, a, k, i=i: log[i].append((a, k)), with_kwargs=True)
               for i, layer in enumerate(decoder_layers(model))]
    return log, handles


def out_hidden(out):
    return out[0] if isinstance(out, tuple) else out


def layer0_reference(model, ids, cfg):
    """Expected layer-0 weights: prune_matrix on H = 2/N Σ xxᵀ built in float64 from a dense full forward."""
    linears = {n: m for n, m in prunable_linears(model).items() if ".0." in n}
    xs = {n: [] for n in linears}
    handles = [m.register_forward_pre_hook(lambda m, a, n=n: xs[n].append(a[0].reshape(-1, a[0].shape[-1])))
               for n, m in linears.items()]
    with torch.no_grad():
        for batch in ids.split(BATCH):
            model(batch)
    for h in handles:
        h.remove()
    expected = {}
    for n, m in linears.items():
        x = torch.cat(xs[n]).double()
        hessian = 2 / x.shape[0] * x.t() @ x
        expected[n] = prune_matrix(weight_as_linear(m).clone(), hessian.float(), cfg.sparsity,
                                   blocksize=cfg.blocksize)[0]
    return expected


@pytest.mark.parametrize("kind", FIVE)
def test_prune_end_to_end(kind):
    model, ids = tiny_model(kind), calib()
    cfg = PruneConfig(sparsity=0.5, batch_size=BATCH, blocksize=16)
    expected0 = layer0_reference(model, ids, cfg)
    log, handles = record_layer_inputs(model)
    result = prune_model(model, ids, cfg)
    for h in handles:
        h.remove()

    linears = prunable_linears(model)
    assert set(result.masks.masks) == set(linears)
    assert sorted(s["name"] for s in result.stats) == sorted(linears)
    assert result.masks.verify(model) == pytest.approx({n: 0.5 for n in linears})
    for s in result.stats:
        mask = result.masks.masks[s["name"]]
        assert s["sparsity"] == 0.5 == mask.float().mean().item()
        assert s["error"] > 0 and s["seconds"] >= 0 and math.isfinite(s["error"])
        assert (weight_as_linear(linears[s["name"]])[mask] == 0).all()
    for name, w in expected0.items():  # the hooks built the right Hessians (Conv1D layout, shared groups)
        torch.testing.assert_close(weight_as_linear(linears[name]), w, rtol=1e-4, atol=1e-5)

    nbatches = math.ceil(NSAMPLES / BATCH)
    layers = decoder_layers(model)
    with torch.no_grad():
        for l in range(len(layers) - 1):  # layer l+1 was calibrated on the *pruned* layer l's outputs
            for b in range(nbatches):
                args, kwargs = log[l][b]
                torch.testing.assert_close(out_hidden(layers[l](*args, **kwargs)), log[l + 1][b][0][0])
        fresh, handles = record_layer_inputs(model)  # ... and they are what the pruned model computes itself
        logits = torch.cat([model(batch).logits for batch in ids.split(BATCH)])
        for h in handles:
            h.remove()
    for l in range(len(layers)):
        for b in range(nbatches):
            torch.testing.assert_close(fresh[l][b][0][0], log[l][b][0][0])
    assert torch.isfinite(logits).all()


def test_shared_and_per_linear_hessians_agree():
    ids = calib()
    shared, alone = tiny_model("llama"), tiny_model("llama")
    prune_model(shared, ids, PruneConfig(sparsity=0.6, batch_size=BATCH))
    prune_model(alone, ids, PruneConfig(sparsity=0.6, batch_size=BATCH, shared_hessian=False))
    for (name, a), b in zip(prunable_linears(shared).items(), prunable_linears(alone).values()):
        torch.testing.assert_close(a.weight, b.weight, rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("method", ["sparsegpt", "wanda", "magnitude"])
def test_base_masks_never_revived(method):
    model, ids = tiny_model("gpt2"), calib()
    first = prune_model(model, ids, PruneConfig(method=method, sparsity=0.5, batch_size=BATCH)).masks
    second = prune_model(model, ids, PruneConfig(method=method, sparsity=0.75, batch_size=BATCH),
                         base_masks=first).masks
    for name, mask in second.masks.items():
        assert (mask | ~first.masks[name]).all(), f"{name} revived a pruned weight"
        assert mask.float().mean().item() == 0.75


def test_base_masks_must_cover_the_pruned_linears():
    model = tiny_model("llama")
    partial = MaskSet({n: torch.zeros_like(weight_as_linear(m), dtype=torch.bool)
                       for n, m in prunable_linears(model, include="mlp").items()})
    with pytest.raises(UserError, match="base masks have no entry for model.layers.0.self_attn.q_proj"):
        prune_model(model, calib(), PruneConfig(batch_size=BATCH), base_masks=partial)


def test_owl_targets_follow_dense_outlier_ratios():
    model, ids = tiny_model("opt"), calib()
    cfg = PruneConfig(sparsity=0.6, allocation="owl", owl_lambda=0.1, owl_m=2.0, batch_size=BATCH)
    # reference: |W|·‖x‖ outlier ratios from the dense model's own forward, in float64
    linears = prunable_linears(model)
    sq = {n: 0 for n in linears}
    handles = [m.register_forward_pre_hook(lambda m, a, n=n: sq.__setitem__(
        n, sq[n] + a[0].double().reshape(-1, a[0].shape[-1]).square().sum(0))) for n, m in linears.items()]
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    ratios = {i: allocation.outlier_ratio([weight_as_linear(m) for n, m in linears.items() if f".{i}." in n],
                                          [sq[n].sqrt() for n in linears if f".{i}." in n], cfg.owl_m)
              for i in range(2)}
    expected = allocation.owl(ratios, 0.6, lam=0.1)
    result = prune_model(model, ids, cfg)
    got = {s["layer"]: s["target"] for s in result.stats}
    assert got == pytest.approx(expected, abs=1e-9)
    assert sum(got.values()) / 2 == pytest.approx(0.6)
    for s in result.stats:
        assert s["sparsity"] == pytest.approx(s["target"], abs=1 / 64)


def test_nm_every_group_of_m_has_n_zeros():
    model = tiny_model("gpt_neox")
    result = prune_model(model, calib(), PruneConfig(prune_n=2, prune_m=4, batch_size=BATCH))
    for name, mask in result.masks.masks.items():
        assert (mask.reshape(mask.shape[0], -1, 4).sum(-1) == 2).all(), name


@pytest.mark.parametrize("cfg, match", [
    (PruneConfig(method="obs"), "method 'obs' is unknown"),
    (PruneConfig(prune_n=4, prune_m=2), "N:M needs 0 < N < M, got 4:2"),
    (PruneConfig(prune_n=2, prune_m=4, allocation="owl"), "N:M sparsity fixes"),
    (PruneConfig(sparsity=1.0), r"sparsity must be in \[0, 1\)"),
    (PruneConfig(include="nothing_matches"), "no prunable linears match include='nothing_matches'"),
    (PruneConfig(dtype="float16"), "solver dtype 'float16' is unknown"),
])
def test_bad_config_is_a_user_error(cfg, match):
    with pytest.raises(UserError, match=match):
        prune_model(tiny_model("llama"), calib(), cfg)


@pytest.mark.parametrize("kind", FIVE)
def test_layerwise_hidden_states_match_the_model(kind):
    model, ids = tiny_model(kind), calib()
    hidden = layerwise_hidden_states(model, ids, device="cpu", batch_size=BATCH, offload=kind == "bloom")
    assert [h.shape[0] for h in hidden] == [4, 2]
    with torch.no_grad():
        expected = model.base_model(ids).last_hidden_state
    torch.testing.assert_close(torch.cat(hidden), expected, rtol=1e-5, atol=1e-5)
