"""Atomic folder writes under SIGKILL: a killed replace never loses the old folder, and a killed writer's temp
folders are cleaned up (by the next write of that folder, or by a run's start) while live writers' stay."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from sparsegpt.core.atomic import recover_tree, write_dir_atomically

WRITER = """
import sys
from pathlib import Path
from sparsegpt.core.atomic import write_dir_atomically
out, text = Path(sys.argv[1]), sys.argv[2]
write_dir_atomically(out, lambda tmp: (tmp / "weights.txt").write_text(text), replace=True)
"""


def _write(out: Path, text: str, failpoint: str | None = None) -> int:
    env = {**os.environ, "SPARSEGPT_FAILPOINT": failpoint or ""}
    return subprocess.run([sys.executable, "-c", WRITER, str(out), text], env=env).returncode


def _leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("."))


def test_replace_killed_between_renames_restores_the_old_folder(tmp_path):
    out = tmp_path / "model"
    assert _write(out, "v1") == 0
    assert _write(out, "v2", "save/between-renames") == -9
    assert not out.exists()  # the kill left the old copy parked aside and the new one unrenamed
    assert [n.split("-")[0] for n in _leftovers(tmp_path)] == [".model.old", ".model.tmp"]
    recover_tree(tmp_path)
    assert (out / "weights.txt").read_text() == "v1" and _leftovers(tmp_path) == []


def test_the_next_write_cleans_a_killed_writers_temp_folder(tmp_path):
    out = tmp_path / "model"
    assert _write(out, "v1") == 0
    assert _write(out, "v2", "save/before-rename") == -9
    assert (out / "weights.txt").read_text() == "v1" and len(_leftovers(tmp_path)) == 1
    write_dir_atomically(out, lambda tmp: (tmp / "weights.txt").write_text("v3"), replace=True)
    assert (out / "weights.txt").read_text() == "v3" and _leftovers(tmp_path) == []


def test_live_writers_and_other_hosts_folders_are_left_alone(tmp_path):
    host = socket.gethostname().replace("-", "_")
    live = tmp_path / "stages" / f".model.tmp-{host}-{os.getpid()}-abc"
    other_host = tmp_path / "stages" / f".model.tmp-{host}x-1-abc"
    for folder in (live, other_host):
        folder.mkdir(parents=True)
    recover_tree(tmp_path)
    assert live.is_dir() and other_host.is_dir()


@pytest.mark.parametrize("name", [".state.json.tmp-123", ".model.tmp-", "model.tmp-host-1-x"])
def test_names_that_are_not_folder_temps_are_ignored(tmp_path, name):
    (tmp_path / name).mkdir()
    recover_tree(tmp_path)
    assert (tmp_path / name).exists()
