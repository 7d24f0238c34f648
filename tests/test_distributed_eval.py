"""Distributed evaluation, 2 gloo CPU processes (tests/dist_eval_worker.py, one torchrun launch for every case)
against the same evaluation in this one process: perplexity whole-model and layerwise with uneven shares and with
fewer windows than ranks, hooks on both ranks (samples on rank 0 only), and failing hooks that stop no rank."""

from __future__ import annotations

import json

import pytest
from dist_eval_worker import BAD_SOURCE, PPL_CASES, cases, good_hooks, write_text
from test_evaluation import windows
from test_zero import _torchrun

from sparsegpt.evaluate.runners import evaluate_hooks, perplexity

pytestmark = pytest.mark.slow
UNKNOWN = "UserError: unknown text source 'no-such-source-xyz'"


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """rank0.json and rank1.json of one 2-process launch (the subprocess timeout turns a hang into a failure)."""
    out = tmp_path_factory.mktemp("disteval")
    write_text(out)
    proc = _torchrun("tests/dist_eval_worker.py", str(out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in records] == [2, 2]
    return out, records


@pytest.fixture(scope="module")
def single():
    """The worker's model, masks, tokenizer and context, in this process (a world of one)."""
    return cases()


@pytest.mark.parametrize("case", PPL_CASES)
def test_distributed_perplexity_equals_one_process(ranks, single, case):
    _, records = ranks
    n, layerwise = PPL_CASES[case]
    expected = perplexity(single[0], windows(n, 16), batch_size=2, device="cpu", layerwise=layerwise)
    got = [r["ppl"][case] for r in records]
    assert got[0] == got[1]  # every rank returns the same numbers
    assert got[0]["value"] == pytest.approx(expected, rel=1e-6)
    assert got[0]["tokens"] == n * 15 and got[0]["windows"] == {5: [3, 2], 1: [1, 0]}[n]


def test_hooks_on_both_ranks_equal_one_process_and_samples_run_on_rank_0_only(ranks, single):
    out, records = ranks
    model, _, tok, ctx = single
    expected = evaluate_hooks(model, tok, good_hooks(out), ctx)
    got = [r["hooks"] for r in records]
    assert got[0] == got[1] and got[0]["errors"] == {} and got[0]["world_size"] == 2
    assert got[0]["metrics"].keys() == expected.metrics.keys()
    for key, value in expected.metrics.items():
        if key.startswith("ppl/"):
            assert got[0]["metrics"][key] == pytest.approx(value, rel=1e-6)
        else:
            assert got[0]["metrics"][key] == value, key  # sparsity and samples: computed once, on rank 0
    assert got[0]["shares"] == {"ppl/text@train": [2, 1]} and expected.shares == {"ppl/text@train": [3]}
    assert [r["samples_calls"] for r in records] == [1, 0]
    assert records[0]["after"] == records[1]["after"]  # the process group still works after every failure


def test_failing_hooks_are_recorded_alike_on_every_rank_and_stop_every_rank_under_fail_fast(ranks, single):
    _, records = ranks
    for key in ("bad_source", "rank1_fails"):
        assert records[0][key] == records[1][key], key
    model, _, tok, ctx = single
    expected = evaluate_hooks(model, tok, BAD_SOURCE, ctx)  # the next hook (sparsity) ran
    assert expected.errors["ppl/no-such-source-xyz"].startswith(UNKNOWN)
    assert records[0]["bad_source"]["errors"] == expected.errors
    assert records[0]["bad_source"]["metrics"] == expected.metrics
    assert records[0]["rank1_fails"]["errors"] == {"ppl/text@train": "RankFailed: rank 1 failed: RuntimeError: "
                                                                "rank-local failure"}
    assert [r["bad_source_fail_fast"]["raised"][:len(UNKNOWN)] for r in records] == [UNKNOWN, UNKNOWN]
    assert [r["rank1_fails_fail_fast"]["raised"] for r in records] == [
        "RankFailed: rank 1 failed: RuntimeError: rank-local failure", "RuntimeError: rank-local failure"]
    assert [r["main_fails_fail_fast"]["raised"] for r in records] == [
        "RuntimeError: generation failed", "RankFailed: eval hook samples failed on rank 0: RuntimeError: generation "
                                           "failed"]

