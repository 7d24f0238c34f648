"""Per-layer targets: uniform, OWL outlier ratios, OWL mapping with floors."""

import pytest
import torch

from sparsegpt.core.errors import UserError
from sparsegpt.prune.allocation import outlier_ratio, owl, uniform

RATIOS = {0: 0.010, 1: 0.050, 2: 0.020, 3: 0.002, 4: 0.030}


def mean(d):
    return sum(d.values()) / len(d)


def test_uniform():
    assert uniform(range(3), 0.7) == {0: 0.7, 1: 0.7, 2: 0.7}
    with pytest.raises(UserError, match=r"target sparsity must be in \[0, 1\)"):
        uniform([0], 1.0)


def test_outlier_ratio_counts_entries_above_m_times_mean():
    g = torch.Generator().manual_seed(0)
    W, norm = torch.randn(16, 32, generator=g), torch.rand(32, generator=g) * 10
    score = (W.double().abs() * norm.double()).flatten().tolist()
    avg = sum(score) / len(score)
    for M in (1.0, 2.0, 5.0):
        assert outlier_ratio(W, norm, M=M) == pytest.approx(sum(s > M * avg for s in score) / len(score))


def test_outlier_ratio_pools_a_layer():
    g = torch.Generator().manual_seed(1)
    W1, W2 = torch.randn(4, 8, generator=g), torch.randn(6, 8, generator=g)
    n1, n2 = torch.rand(8, generator=g), torch.rand(8, generator=g) * 20
    pooled = outlier_ratio([W1, W2], [n1, n2], M=2.0)
    stacked = outlier_ratio(torch.cat([W1 * n1, W2 * n2]), torch.ones(8), M=2.0)
    assert pooled == pytest.approx(stacked)
    with pytest.raises(UserError, match=r"act_norm must have shape \(8,\)"):
        outlier_ratio(W1, torch.ones(5))


def test_owl_mean_is_target_and_more_outliers_get_lower_sparsity():
    result = owl(RATIOS, 0.7, lam=0.08)
    assert mean(result) == pytest.approx(0.7, abs=1e-12)
    order = sorted(RATIOS, key=RATIOS.get)
    assert [result[i] for i in order] == sorted(result.values(), reverse=True)
    assert max(result.values()) - min(result.values()) == pytest.approx(0.16)
    assert result[1] < 0.7 < result[3]


def test_owl_equal_ratios_and_zero_lambda_are_uniform():
    assert owl({0: 0.1, 1: 0.1}, 0.6) == {0: 0.6, 1: 0.6}
    assert owl(RATIOS, 0.6, lam=0.0) == pytest.approx(uniform(RATIOS, 0.6))


def test_owl_floors_respected_and_mean_kept():
    floors = {1: 0.72, 2: 0.70}  # layer 1 (most outliers) would get ~0.62 without its floor
    result = owl(RATIOS, 0.7, lam=0.08, floors=floors)
    free = owl(RATIOS, 0.7, lam=0.08)
    assert mean(result) == pytest.approx(0.7, abs=1e-12)
    assert all(result[i] >= f - 1e-12 for i, f in floors.items())
    assert result[1] == pytest.approx(0.72)
    lowered = [i for i in RATIOS if result[i] > floors.get(i, 0)]
    drops = {round(free[i] - result[i], 12) for i in lowered}
    assert len(drops) == 1 and drops.pop() > 0  # the unclamped layers pay the same amount


def test_owl_results_stay_in_range():
    low = owl(RATIOS, 0.03, lam=0.08)
    assert min(low.values()) == 0.0 and mean(low) == pytest.approx(0.03, abs=1e-12)
    with pytest.raises(UserError, match="sparsity .* >= 1"):
        owl({0: 0.0, 1: 1.0}, 0.95, lam=0.08)


def test_owl_impossible_floors_raise():
    with pytest.raises(UserError, match=r"floors average 0\.8 > target 0\.7"):
        owl(RATIOS, 0.7, floors={i: 0.8 for i in RATIOS})
    with pytest.raises(UserError, match=r"no outlier ratio"):
        owl(RATIOS, 0.7, floors={9: 0.5})
