"""bench/prune/vs_llmcompressor.py: offline and fast: its CLI, the calibration file both sides read, the report; the
venv it creates (only where --setup was run) keeps the pinned CPU torch."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parents[1] / "bench" / "prune" / "vs_llmcompressor.py"


def _module():
    spec = importlib.util.spec_from_file_location("vs_llmcompressor", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


vs = _module()


def test_help_runs_without_the_venv():
    done = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, check=True)
    assert "--setup" in done.stdout and "--runs" in done.stdout


def test_calibration_file_round_trips(tmp_path):
    ids = torch.randint(0, 49152, (4, 16))
    vs.save_calibration(ids.to(torch.int32), tmp_path / "calib.pt")  # stored as int64 whatever it came as
    back = vs.load_calibration(tmp_path / "calib.pt")
    assert back.dtype == torch.int64 and torch.equal(back, ids)
    torch.save(torch.zeros(3), tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="2-D int64"):
        vs.load_calibration(tmp_path / "bad.pt")


def test_report_table_and_ratio():
    def row(side, run, prune):
        return {"side": side, "run": run, "prune_cpu_s": prune, "process_cpu_s": prune + 10, "child_cpu_s": prune + 11,
                "prune_wall_s": 2 * prune, "sparsity": 0.5, "ppl_stdlib-docs": 20.0, "ppl_debian-licenses": 50.0,
                "load_before": (3.0, 3.0, 3.0), "peak_rss_mb": 1000.0}

    record = {"runs": 1, "commit": "abc1234", "date": "2026-12-06T00:00:00+00:00",
              "machine": {"cpu": "Test CPU", "cores": 2, "flags_of_note": ["avx2"], "python": "3.11", "torch": "2",
                          "transformers": "5"},
              "load_average": {"start": (1, 1, 1), "end": (2, 2, 2)},
              "venv_freeze": ["llmcompressor==0.14.0", "torch==2.13.0+cpu"],
              "dense": {"sparsity": 0.0, "ppl_stdlib-docs": 15.0, "ppl_debian-licenses": 40.0},
              "rows": [row("ours", 0, 30.0), row("llmcompressor", 0, 60.0)]}
    text = vs.report([record, {**record, "llmc_batch_size": 8}])
    line = "| 0 | ours | 30.0 | 40.0 | 41.0 | 60.0 | 0.50× | – | 0.500000 | 20.00 | 50.00 | 1000 | 3.0 |"
    assert text.count(line) == 2
    assert "prune CPU = **0.50×**" in text and "llmcompressor 0.14.0, torch 2.13.0+cpu" in text
    assert "`--runs 1`" in text and "`--runs 1 --llmc-batch-size 8`" in text


@pytest.mark.skipif(not (vs.VENV / "bin" / "python").exists(), reason="no .venv-llmcompressor (bench --setup)")
def test_venv_kept_the_pinned_cpu_torch():
    code = "from importlib.metadata import version; print(version('torch'), version('llmcompressor'))"
    out = subprocess.run([str(vs.VENV / "bin" / "python"), "-c", code], capture_output=True, text=True, check=True)
    torch_version, llmc_version = out.stdout.split()
    assert torch_version.startswith(vs.TORCH_VERSION) and "+cpu" in torch_version
    assert llmc_version == vs.LLMC_VERSION
