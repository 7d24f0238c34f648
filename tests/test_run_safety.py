"""Runs that survive a cluster (issue 21), with real processes and real signals: one writer per run dir (a second
launch is refused, a dead holder's lock taken over), preemption (SIGTERM/SIGUSR1/Ctrl-C: the step finished, a
checkpoint written, exit 75, the same command resumes bit for bit), damaged inputs and a full disk (one-line
errors, nothing complete removed, the same command works once the cause is fixed).

Signals land at known points through the failpoints (`SPARSEGPT_FAILPOINT=point:n:SIGNAL[@rank]`: the process sends
itself a real signal there); a run held with SIGSTOP is how a second launch meets a live first one.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from launching import free_port

from sparsegpt.core.errors import UserError
from sparsegpt.run.lock import LOCK_NAME, RunLock

ROOT = Path(__file__).resolve().parents[1]

RECIPE = """\
name: safe2
model: {model}
dtype: float32
seed: 0
data: {{calibration: stdlib-docs}}
{distributed}defaults:
  prune: {{nsamples: 8, seqlen: 32, batch_size: 4, blocksize: 16}}
  finetune: {{steps: 4, seqlen: 32, lr: 1.0e-3, warmup_steps: 1, checkpoint_every: 2, log_every: 1}}
  eval:
    hooks:
      - {{type: perplexity, source: stdlib-docs, seqlen: 32, max_windows: 4}}
      - {{type: sparsity}}
stages:
  - {{name: s50, target: 0.5}}
  - {{name: s70, target: 0.7}}
"""
ZERO3 = "distributed: {zero_stage: 3, micro_batch_size: 2, grad_accum: 1}\n"


def write_recipe(path: Path, model: Path, *, procs: int = 1) -> Path:
    path.write_text(RECIPE.format(model=model, distributed=ZERO3 if procs == 2 else ""))
    return path


def start(recipe: Path, run_dir: Path, *, failpoint: str | None = None, procs: int = 1) -> subprocess.Popen:
    """train/progressive.py in its own session (1 process, or 2 under accelerate launch with ZeRO-3 on CPU);
    output goes to files beside the run dir (read by `finish`)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SPARSEGPT_NO_PROGRESS": "1", "PYTHONHASHSEED": "0"}
    env.pop("SPARSEGPT_FAILPOINT", None)
    if failpoint:
        env["SPARSEGPT_FAILPOINT"] = failpoint
    script = [str(ROOT / "train" / "progressive.py"), "--recipe", str(recipe), "--run-dir", str(run_dir)]
    if procs == 1:
        cmd = [sys.executable, *script]
    else:
        env.update(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "recipes/accelerate/zero3.yaml",
               "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(free_port()), *script]
    log = run_dir.parent / f"{run_dir.name}.{time.monotonic_ns()}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    proc.log = log
    return proc


def finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[int, str]:
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return rc, proc.log.read_text()


def run(recipe: Path, run_dir: Path, **kw) -> tuple[int, str]:
    return finish(start(recipe, run_dir, **kw))


def records(run_dir: Path) -> list[tuple]:
    """What must match between runs (not wall times)."""
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [(r["stage"], r["phase"], r["sparsity"], json.dumps(r["metrics"], sort_keys=True)) for r in recs]


def errors(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error: ")]


def listing(run_dir: Path) -> dict[str, int]:
    """Every file under the run dir with its size (the lock aside: it is the live run's)."""
    return {str(p.relative_to(run_dir)): p.stat().st_size for p in sorted(run_dir.rglob("*"))
            if p.is_file() and not p.name.startswith(LOCK_NAME)}


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                kids = [int(k) for k in (task / "children").read_text().split()]
            except OSError:
                continue
            out += kids
            todo += kids
    return out


def wait_stopped(pids: list[int], timeout: float = 300) -> None:
    """Until every pid is stopped (state T: it sent itself SIGSTOP at its failpoint)."""
    end = time.time() + timeout
    while time.time() < end:
        states = []
        for pid in pids:
            try:
                states.append(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0])
            except OSError:
                states.append("gone")
        assert "gone" not in states and "Z" not in states, states
        if all(s == "T" for s in states):
            return
        time.sleep(0.2)
    raise AssertionError(f"processes {pids} did not stop")


def python_ranks(launcher: subprocess.Popen, n: int, timeout: float = 120) -> list[int]:
    """The `n` training processes under `launcher` (itself when n == 1)."""
    if n == 1:
        return [launcher.pid]
    end = time.time() + timeout
    while time.time() < end:
        ranks = [p for p in descendants(launcher.pid) if "progressive.py" in _cmdline(p)]
        if len(ranks) == n:
            return ranks
        time.sleep(0.5)
    raise AssertionError("ranks not found")


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text()
    except OSError:
        return ""


@pytest.fixture(scope="module")
def reference(tiny_llama_dir, tmp_path_factory):
    """The uninterrupted 1-process run: (recipe, its records)."""
    tmp = tmp_path_factory.mktemp("safety-ref")
    recipe = write_recipe(tmp / "safe2.yaml", tiny_llama_dir)
    rc, out = run(recipe, tmp / "run")
    assert rc == 0, out[-3000:]
    return recipe, records(tmp / "run")


@pytest.fixture(scope="module")
def zero3_reference(tiny_llama_dir, tmp_path_factory):
    """The uninterrupted 2-process ZeRO-3 run: (recipe, its records)."""
    tmp = tmp_path_factory.mktemp("safety-z3")
    recipe = write_recipe(tmp / "z3.yaml", tiny_llama_dir, procs=2)
    rc, out = run(recipe, tmp / "run", procs=2)
    assert rc == 0, out[-4000:]
    return recipe, records(tmp / "run")


# -- one writer per run dir -------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("procs", [1, 2])
def test_second_launch_on_a_live_run_is_refused(procs, reference, zero3_reference, tmp_path):
    """The first launch holds (stopped by SIGSTOP at fine-tuning step 2, its lock held); the second exits non-zero
    at once with a one-line error naming the holder, on every rank, having written nothing; the first then
    finishes with the uninterrupted run's metrics."""
    recipe = reference[0] if procs == 1 else zero3_reference[0]
    expected = reference[1] if procs == 1 else zero3_reference[1]
    run_dir = tmp_path / "run"
    first = start(recipe, run_dir, failpoint="finetune/step:2:SIGSTOP", procs=procs)
    ranks = python_ranks(first, procs)
    wait_stopped(ranks)
    before = listing(run_dir)
    rc, out = run(recipe, run_dir, procs=procs)
    assert rc != 0, out[-3000:]
    holder = json.loads((run_dir / LOCK_NAME).read_text())
    lines = errors(out)
    assert len(lines) == procs, out[-3000:]  # one line on every rank
    assert all(f"is in use by pid {holder['pid']} on {socket.gethostname()} since" in line for line in lines), lines
    assert holder["pid"] == ranks[0]
    if procs == 1:
        assert out.strip() == lines[0] and rc == 2, out  # nothing but the error: no traceback
    assert listing(run_dir) == before
    for pid in ranks:
        os.kill(pid, signal.SIGCONT)
    rc, out = finish(first)
    assert rc == 0, out[-3000:]
    assert records(run_dir) == expected
    assert not (run_dir / LOCK_NAME).exists()


def test_lock_refuses_a_live_holder_and_takes_over_dead_ones(tmp_path):
    """Live: this process (flock held, pid alive). Dead: a pid of this host that has exited; another host's lock
    whose heartbeat stopped. Another host's fresh heartbeat: refused (flock may not reach across nodes)."""
    root = tmp_path / "run"
    held = RunLock(root)
    held.acquire()
    with pytest.raises(UserError, match=rf"in use by pid {os.getpid()} on "):
        RunLock(root).acquire()
    held.release()
    assert not root.exists()  # nothing else was written: the run dir it made is gone again

    dead = subprocess.Popen(["true"])
    dead.wait()
    root.mkdir()
    lock = root / LOCK_NAME
    me = RunLock(root).info()
    lock.write_text(json.dumps({**me, "pid": dead.pid, "token": "old"}))
    taker = RunLock(root)
    taker.acquire()
    assert json.loads(lock.read_text())["token"] == taker._token
    taker.release()

    lock.write_text(json.dumps({**me, "host": "node-elsewhere", "pid": 1, "token": "remote"}))
    with pytest.raises(UserError, match="in use by pid 1 on node-elsewhere"):
        RunLock(root).acquire()
    stale = time.time() - 3600
    os.utime(lock, (stale, stale))
    taker = RunLock(root)
    taker.acquire()
    assert json.loads(lock.read_text())["host"] == socket.gethostname()
    taker.release()


@pytest.mark.parametrize("stale", [False, True], ids=["fresh", "stale-lock"])
def test_racing_starters_get_one_lock(stale, tmp_path):
    """Six processes take the lock of one run dir at the same moment (a fresh dir, or one whose lock a dead process
    left: the takeover race): exactly one holds it, the others are refused naming it."""
    root = tmp_path / "run"
    if stale:
        dead = subprocess.Popen(["true"])
        dead.wait()
        root.mkdir()
        (root / LOCK_NAME).write_text(json.dumps({**RunLock(root).info(), "pid": dead.pid, "token": "old"}))
    go = time.time() + 3
    code = ("import sys, time\n"
            "from pathlib import Path\n"
            "from sparsegpt.core.errors import UserError\n"
            "from sparsegpt.run.lock import RunLock\n"
            f"time.sleep(max(0, {go} - time.time()))\n"
            "lock = RunLock(Path(sys.argv[1]))\n"
            "try:\n"
            "    lock.acquire()\n"
            "except UserError as e:\n"
            "    print('refused', e, flush=True)\n"
            "    sys.exit(2)\n"
            "print('holder', flush=True)\n"
            "time.sleep(4)\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(root)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
             for _ in range(6)]
    outs = [(p.wait(timeout=60), p.stdout.read()) for p in procs]
    holders = [out for rc, out in outs if rc == 0]
    assert len(holders) == 1 and holders[0].startswith("holder"), outs
    assert all(rc == 2 and "is in use by pid" in out for rc, out in outs if rc != 0), outs


# -- preemption ---------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_stop_signals_stop_at_safe_points_and_resume_exactly(reference, tmp_path):
    """SIGUSR1 while pruning: exit 75 after the current layer, nothing of the phase on disk. SIGTERM during
    fine-tuning: the step finishes, its checkpoint is written, exit 75; the same command resumes from that very
    step (no step lost) to the uninterrupted run's metrics, bit for bit."""
    recipe, expected = reference
    run_dir = tmp_path / "run"
    rc, out = run(recipe, run_dir, failpoint="prune/layer:1:SIGUSR1")
    assert rc == 75, out[-3000:]
    assert "stopped by SIGUSR1 after pruning layer 1/2: exiting with 75; run the same command to resume" in out
    assert "Traceback" not in out
    assert not list((run_dir / "stages").glob("*/pruned")) if (run_dir / "stages").exists() else True
    assert json.loads((run_dir / "state.json").read_text())["stages"] == {}

    rc, out = run(recipe, run_dir, failpoint="finetune/step:3:SIGTERM")
    assert rc == 75, out[-3000:]
    assert "stopped by SIGTERM after fine-tuning step 3/4, its checkpoint written: exiting with 75" in out
    ckpt = run_dir / "stages" / "00-s50" / "ckpt" / "step-00000003"
    assert (ckpt / "manifest.json").is_file()

    rc, out = run(recipe, run_dir)
    assert rc == 0, out[-3000:]
    assert f"resumed from {ckpt} (step 3 of 4)" in out  # steps lost: 0
    assert records(run_dir) == expected


@pytest.mark.slow
def test_sigterm_mid_zero3_finetuning_stops_every_rank_and_resumes_exactly(zero3_reference, tmp_path):
    """2 processes, ZeRO-3. First SIGTERM reaches rank 0 alone after stage 0's step 3: rank 1 learns it through
    the step's all-reduce, both write the step-3 checkpoint and exit 75 (accelerate launch: exit 1, its summary
    `exitcode : 75`). Resumed from step 3, the run is held (SIGSTOP) at stage 1's step 3 and the launcher gets
    SIGTERM, as a cluster sends it: it forwards it to the ranks, which checkpoint that step and exit 75; the
    launcher exits 143. The same command then reaches the uninterrupted run's metrics, bit for bit."""
    recipe, expected = zero3_reference
    run_dir = tmp_path / "run"
    rc, out = run(recipe, run_dir, failpoint="finetune/step:3:SIGTERM@0", procs=2)
    assert rc == 1 and "exitcode  : 75" in out, out[-4000:]
    assert out.count("after fine-tuning step 3/4, its checkpoint written: exiting with 75") == 2, out[-4000:]
    ckpt = run_dir / "stages" / "00-s50" / "ckpt" / "step-00000003"
    assert (ckpt / "manifest.json").is_file()

    launcher = start(recipe, run_dir, failpoint="finetune/step:4:SIGSTOP", procs=2)  # stage 1, step 3
    ranks = python_ranks(launcher, 2)
    wait_stopped(ranks)
    os.kill(launcher.pid, signal.SIGTERM)
    time.sleep(1)  # the launcher has forwarded it: pending on the stopped ranks
    for pid in ranks:
        os.kill(pid, signal.SIGCONT)
    rc, out = finish(launcher)
    assert rc == 143, out[-4000:]
    assert out.count(f"resumed from {ckpt} (step 3 of 4)") == 2
    assert out.count("stopped by SIGTERM after fine-tuning step 3/4, its checkpoint written") == 2, out[-4000:]
    assert (run_dir / "stages" / "01-s70" / "ckpt" / "step-00000003" / "manifest.json").is_file()

    rc, out = run(recipe, run_dir, procs=2)
    assert rc == 0, out[-4000:]
    assert out.count("step-00000003 (step 3 of 4)") == 2  # no step lost
    assert records(run_dir) == expected


def test_second_ctrl_c_aborts_at_once(tmp_path):
    """The first Ctrl-C asks for a stop; one within DOUBLE_INTERRUPT_S (a launcher's echo) changes nothing; a later
    one kills the process with SIGINT."""
    code = ("import os, signal, time\n"
            "from sparsegpt.core import signals\n"
            "signals.install(60)\n"
            "os.kill(os.getpid(), signal.SIGINT)\n"
            "os.kill(os.getpid(), signal.SIGINT)\n"
            "assert signals.requested() == 'SIGINT'\n"
            "print('still running', flush=True)\n"
            "signals._STATE.at -= signals.DOUBLE_INTERRUPT_S + 1\n"
            "os.kill(os.getpid(), signal.SIGINT)\n"
            "time.sleep(5)\n"
            "print('not reached', flush=True)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == -signal.SIGINT, proc.stderr[-2000:]
    assert proc.stdout == "still running\n"
    assert "second interrupt: aborting now" in proc.stderr


def test_grace_budget_bounds_the_stop(tmp_path):
    """A stop that does not reach its safe point within preempt_grace_s ends the process anyway, with exit 75."""
    code = ("import os, signal, time\n"
            "from sparsegpt.core import signals\n"
            "signals.install(0.5)\n"
            "os.kill(os.getpid(), signal.SIGTERM)\n"
            "time.sleep(30)\n")
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 75, proc.stderr[-2000:]
    assert "took longer than preempt_grace_s=0.5" in proc.stderr
    assert time.time() - t0 < 30


# -- damaged inputs, full disk ---------------------------------------------------------------------------------

def _truncate(path: Path, keep: float = 0.5) -> bytes:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return data


@pytest.mark.slow
def test_damaged_stage_model_and_checkpoints_give_one_line_errors(reference, tmp_path):
    """A truncated stage model and truncated checkpoints: one-line errors, exit 2, nothing removed; the damaged
    newest checkpoint is passed over for the one before it; deleting the damaged stage model as the error says
    redoes that stage; the run ends with the uninterrupted metrics."""
    recipe, expected = reference
    run_dir = tmp_path / "run"
    rc, out = run(recipe, run_dir, failpoint="finetune/step:7:SIGTERM")  # stage 1, step 3: stage 0 complete
    assert rc == 75, out[-3000:]
    ckpts = run_dir / "stages" / "01-s70" / "ckpt"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-00000002", "step-00000003"]

    # both checkpoints damaged: an error naming the newest and what to do
    weights = {step: next(p for p in (ckpts / step).iterdir() if p.suffix in (".safetensors", ".bin"))
               for step in ("step-00000002", "step-00000003")}
    originals = {step: _truncate(path) for step, path in weights.items()}
    before = listing(run_dir)
    rc, out = run(recipe, run_dir)
    assert rc == 2, out[-3000:]
    (line,) = errors(out)
    assert "step-00000003 is damaged" in line and "no earlier one is whole; delete" in line, line
    assert "Traceback" not in out
    assert listing(run_dir) == before

    # the older one restored: the newer one is passed over (logged), fine-tuning resumes at step 2
    weights["step-00000002"].write_bytes(originals["step-00000002"])
    stage0 = run_dir / "stages" / "00-s50" / "model" / "model.safetensors"
    _truncate(stage0)  # and stage 0's model damaged: stage 1 does not read it any more, so nothing fails
    rc, out = run(recipe, run_dir)
    assert rc == 0, out[-3000:]
    assert "step-00000003 is damaged" in out and "resuming from" in out and "step-00000002" in out
    assert records(run_dir) == expected

    # a stage model another stage starts from: a fresh run stopped after stage 0, its model truncated
    run_dir = tmp_path / "run2"
    rc, out = run(recipe, run_dir, failpoint="prune/layer:3:SIGTERM")
    assert rc == 75, out[-3000:]
    stage0 = run_dir / "stages" / "00-s50" / "model"
    _truncate(stage0 / "model.safetensors")
    before = listing(run_dir)
    rc, out = run(recipe, run_dir)
    assert rc == 2, out[-3000:]
    (line,) = errors(out)
    assert "model.safetensors is truncated, damaged or not a safetensors file" in line
    assert "delete that folder and run the same command again" in line and "Traceback" not in out
    assert listing(run_dir) == before
    shutil.rmtree(stage0)
    rc, out = run(recipe, run_dir)
    assert rc == 0, out[-3000:]
    assert records(run_dir) == expected


@pytest.mark.parametrize("damage", ["missing-shard", "foreign-file"])
def test_damaged_model_folder_is_refused_before_the_run_dir(damage, tiny_llama_dir, tmp_path):
    """A --model folder with a missing shard or a file that is no safetensors: one line, exit 2, no run dir."""
    from sparsegpt.storage.models import load_model

    model_dir = tmp_path / "model"
    model, tok = load_model(tiny_llama_dir)
    model.save_pretrained(model_dir, max_shard_size="200KB")
    tok.save_pretrained(model_dir)
    shards = sorted(model_dir.glob("model-*.safetensors"))
    assert len(shards) > 1
    if damage == "missing-shard":
        shards[-1].unlink()
        expect = f"lacks {shards[-1].name}"
    else:
        shards[0].write_bytes((model_dir / "tokenizer.json").read_bytes())
        expect = "not a safetensors file"
    recipe = write_recipe(tmp_path / "r.yaml", model_dir)
    rc, out = run(recipe, tmp_path / "run")
    assert rc == 2 and expect in out and len(out.strip().splitlines()) == 1, out[-3000:]
    assert not (tmp_path / "run").exists()


def test_weights_of_another_model_are_refused(tmp_path, tiny_llama_dir, make_tiny_model):
    """A whole safetensors file whose tensors are another model's: no random weights, one line."""
    from sparsegpt.storage.models import load_model

    folder = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, folder)
    make_tiny_model("opt").save_pretrained(tmp_path / "opt")
    shutil.copy(tmp_path / "opt" / "model.safetensors", folder / "model.safetensors")
    with pytest.raises(UserError, match="do not belong to its config.json"):
        load_model(folder)


def test_checkpoint_whose_manifest_lies_is_found(tmp_path):
    from sparsegpt.heal.checkpoint import verify

    ckpt = tmp_path / "step-00000004"
    ckpt.mkdir()
    (ckpt / "model.safetensors").write_bytes(b"x" * 10)
    manifest = {"step": 4, "files": {"model.safetensors": 10, "optimizer.bin": 5}}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    assert verify(ckpt)[1] == "optimizer.bin is missing"
    (ckpt / "optimizer.bin").write_bytes(b"y" * 4)
    assert verify(ckpt)[1] == "optimizer.bin has 4 bytes, its manifest says 5"
    (ckpt / "manifest.json").write_text(json.dumps({**manifest, "step": 6}))
    assert verify(ckpt)[1] == "its manifest says step 6"


def test_mask_file_damaged_or_foreign_is_a_user_error(tmp_path, tiny_llama_dir):
    from sparsegpt.core.masks import MaskSet

    bad = tmp_path / "mask.safetensors"
    shutil.copy(tiny_llama_dir / "model.safetensors", bad)
    with pytest.raises(UserError, match="is not a sparsegpt mask file"):
        MaskSet.load(bad)
    _truncate(bad)
    with pytest.raises(UserError, match="truncated, damaged or not a safetensors file"):
        MaskSet.load(bad)


@pytest.fixture
def tmpfs(tmp_path):
    """A small tmpfs at tmp_path/disk (root and mount(8) needed: skipped otherwise); remount(size) resizes it."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")

    def remount(size: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(disk)], check=True)

    yield disk, remount
    subprocess.run(["umount", "-l", str(disk)], check=False)


@pytest.mark.slow
def test_full_disk_is_one_line_and_resumes_once_freed(reference, tmpfs, tmp_path):
    """A run dir on a 2 MiB tmpfs: the stage's pre-check passes (the model folders fit), the checkpoint write hits
    ENOSPC: one line naming the folder, bytes needed and free, exit 2, no temp or incomplete checkpoint left,
    nothing complete removed. Given room, the same command resumes to the uninterrupted metrics. On a disk
    smaller than the models a stage writes, the stage is refused before it starts."""
    recipe, expected = reference
    disk, remount = tmpfs
    run_dir = disk / "run"
    rc, out = run(recipe, run_dir)
    assert rc == 2, out[-3000:]
    (line,) = errors(out)
    assert "no space left on the device of" in line and "needed" in line and "free" in line, line
    print(line)
    assert "Traceback" not in out
    leftovers = [p for p in run_dir.rglob("*") if ".tmp-" in p.name or (p.name.startswith("step-")
                                                                          and not (p / "manifest.json").exists())]
    assert leftovers == []
    before = listing(run_dir)
    remount("64m")
    rc, out = run(recipe, run_dir)
    assert rc == 0, out[-3000:]
    assert records(run_dir) == expected
    assert all(name in listing(run_dir) for name in before if "/ckpt/" not in name and "/pruned/" not in name)

    shutil.rmtree(run_dir)
    remount("300k")
    rc, out = run(recipe, disk / "small")
    assert rc == 2, out[-3000:]
    (line,) = errors(out)
    assert "stage s50 will write at least" in line, line
