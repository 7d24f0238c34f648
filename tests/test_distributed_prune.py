"""The distributed SparseGPT pass: 2 gloo CPU processes (one torchrun of tests/dist_prune_worker.py) prune tiny
Llama, OPT and Qwen2-MoE models — unstructured, 2:4, OWL, the MoE top-up rule, a world larger than the calibration
set and than a layer's groups — and `sparsegpt prune` under the same launch. Each must equal the single-process
pass on the same calibration set (masks >= 99.9 % identical, per-linear reconstruction error within 0.1 %; with
layer-wise reconstruction, weights and per-layer output errors equal up to float rounding),
leave both ranks with identical weights, masks and stats, and record a world where both ranks did work; a solve
that fails on one rank fails both (then the CLI still runs in the same group). The MoE case with its expert
Hessians one expert at a time (issue 24 (4)) ends bitwise where the one with all of them at once ends."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dist_prune_worker import CASES, build, outcome, prune
from launching import free_port

from sparsegpt import cli
from sparsegpt.core.masks import MaskSet
from sparsegpt.storage.models import save_model

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def launched(tmp_path_factory, make_tiny_model, tiny_tokenizer) -> tuple[Path, Path, subprocess.CompletedProcess]:
    """One 2-process torchrun of the worker: every library case, then `sparsegpt prune` on a saved tiny Llama."""
    out, model_dir = tmp_path_factory.mktemp("dist-prune"), tmp_path_factory.mktemp("dist-model") / "llama"
    save_model(make_tiny_model("llama"), tiny_tokenizer, model_dir)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "SPARSEGPT_NO_PROGRESS": "1",
           "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "tests/dist_prune_worker.py", str(out), str(model_dir)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, model_dir, proc


@pytest.fixture(scope="module")
def ranks(launched) -> list[dict]:
    return [torch.load(launched[0] / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


def _mask_agreement(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return sum(int((a[k] == b[k]).sum()) for k in a) / sum(m.numel() for m in a.values())


@pytest.mark.parametrize("case", sorted(CASES))
def test_two_ranks_equal_one_process(case, ranks):
    torch.set_num_threads(1)
    model, ids, cfg = build(case)
    reference = outcome(model, prune(case, model, ids, cfg))
    mine, other = ranks[0][case], ranks[1][case]
    for key in mine["weights"]:  # every rank ends each layer with the same weights
        assert torch.equal(mine["weights"][key], other["weights"][key]), key
    assert all(torch.equal(mine["masks"][k], other["masks"][k]) for k in mine["masks"])
    assert list(mine["masks"]) == list(other["masks"]) == list(reference["masks"])  # collectives iterate them
    assert mine["stats"] == other["stats"] and mine["world"] == other["world"]
    assert _mask_agreement(mine["masks"], reference["masks"]) >= 0.999
    assert [s["name"] for s in mine["stats"]] == [s["name"] for s in reference["stats"]]
    for got, want in zip(mine["stats"], reference["stats"]):
        assert got["error"] == pytest.approx(want["error"], rel=1e-3, abs=1e-9), got["name"]
        assert (got["tokens"], got["pooled_weight"], got["target"]) == pytest.approx(
            (want["tokens"], want["pooled_weight"], want["target"]), rel=1e-6), got["name"]  # counts reduced first
    if cfg.reconstruct is not None:  # same steps as one process: weights and errors equal up to float rounding
        untimed = [[{k: v for k, v in r.items() if k != "seconds"} for r in rank["reconstruction"]]
                   for rank in (mine, other)]
        assert untimed[0] == untimed[1]  # every rank took the same steps and measured the same errors
        for got, want in zip(mine["reconstruction"], reference["reconstruction"]):
            assert (got["layer"], got["steps"], got["reverted"]) == (want["layer"], want["steps"], want["reverted"])
            assert (got["error_before"], got["error_after"]) == pytest.approx(
                (want["error_before"], want["error_after"]), rel=1e-4)
            assert got["error_after"] < got["error_before"]
        for key, weight in reference["weights"].items():
            torch.testing.assert_close(mine["weights"][key], weight, rtol=1e-4, atol=1e-5, msg=key)
    for r, rank in enumerate(ranks):  # the LayerAccess seam brackets every use of every layer on every rank
        expected = [(step, i, *extra) for i in range(2) for step, extra in (("enter", ()), ("leave", (True,)))]
        if cfg.allocation == "owl":
            expected = [(s, i, *([False] if s == "leave" else [])) for s, i, *_ in expected] + expected
        assert rank[case]["access"] == expected, r


def test_chunked_expert_hessians_equal_the_one_pass_on_two_ranks(ranks):
    """Issue 24 (4): the MoE case with its experts' Hessians summed and solved one expert at a time ends, on each
    rank, bitwise where the pass with all of them at once ends (only who solved what and the seconds differ)."""
    def untimed(stats):
        return [{k: v for k, v in s.items() if k not in ("seconds", "rank")} for s in stats]

    for rank in ranks:
        whole, chunked = rank["moe"], rank["moe-chunked"]
        assert list(chunked["masks"]) == list(whole["masks"])
        assert all(torch.equal(chunked["masks"][k], whole["masks"][k]) for k in whole["masks"])
        assert all(torch.equal(chunked["weights"][k], whole["weights"][k]) for k in whole["weights"])
        assert untimed(chunked["stats"]) == untimed(whole["stats"])


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_world_record_shows_the_split(case, ranks):
    _, rows, _ = CASES[case]
    world = ranks[0][case]["world"]
    stats = ranks[0][case]["stats"]
    assert world["size"] == 2 and [r["rank"] for r in world["ranks"]] == [0, 1]
    assert [r["calibration_rows"] for r in world["ranks"]] == [(rows + 1) // 2, rows // 2]
    assert sum(r["linears"] for r in world["ranks"]) == len(stats)
    for r in world["ranks"]:
        assert r["linears"] == sum(s["rank"] == r["rank"] for s in stats)
    if case == "one-group":  # one group per layer, two layers: rank 0 solves both, rank 1 waits and receives
        assert [r["groups"] for r in world["ranks"]] == [2, 0]
    else:
        assert all(r["groups"] > 0 for r in world["ranks"])


def test_a_solve_failing_on_one_rank_fails_every_rank(launched):
    messages = [json.loads((launched[0] / f"failure-rank{r}.json").read_text()) for r in (0, 1)]
    assert messages == ["synthetic failure solving model.layers.1.mlp.gate_proj"] * 2  # no rank left waiting


def test_cli_under_torchrun_matches_one_process_and_bad_input_fails_on_every_rank(launched, tmp_path, monkeypatch):
    out, model_dir, proc = launched
    codes = [json.loads((out / f"cli-rank{r}.json").read_text()) for r in (0, 1)]
    assert codes == [{"good": 0, "bad": 2}] * 2
    assert proc.stderr.count("error: --nsamples must be >= 1, got 0") == 2  # one line per rank
    assert not (out / "cli-bad").exists()
    report = json.loads((out / "cli" / "sparsity.json").read_text())
    world = report["world"]
    assert world["size"] == 2 and [r["calibration_rows"] for r in world["ranks"]] == [3, 2]
    assert all(r["linears"] > 0 for r in world["ranks"])
    assert {s["rank"] for s in report["stats"]} == {0, 1}
    monkeypatch.setenv("SPARSEGPT_NO_PROGRESS", "1")
    assert cli.main(["prune", "--model", str(model_dir), "--calib", "stdlib-docs", "--seqlen", "16", "--batch-size",
                     "3", "--sparsity", "0.5", "--nsamples", "5", "--out", str(tmp_path / "one")]) == 0
    single = json.loads((tmp_path / "one" / "sparsity.json").read_text())
    assert single["world"]["size"] == 1 and single["world"]["ranks"][0]["calibration_rows"] == 5
    assert _mask_agreement(MaskSet.load(out / "cli" / "mask.safetensors").masks,
                           MaskSet.load(tmp_path / "one" / "mask.safetensors").masks) >= 0.999
    for got, want in zip(report["stats"], single["stats"]):
        assert got["error"] == pytest.approx(want["error"], rel=1e-3, abs=1e-9), got["name"]
