"""The streamed pass's allocator policy: on glibc, buffers of 1 MiB and more are really mmapped under it (a
fresh process whose dynamic threshold was first raised, as freeing a layer raises it); elsewhere a no-op."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest

from sparsegpt.core import allocator
from sparsegpt.core.errors import UserError
from sparsegpt.prune.sequential import PruneConfig
from sparsegpt.prune.streaming import prune_streamed

PROBE = r"""
import ctypes, json
from sparsegpt.core.allocator import StreamingPolicy

class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.mallinfo2.restype = Mallinfo2

def mmapped(size):
    # whether a block of `size` bytes is served by mmap (one more mmapped block while it lives)
    before = libc.mallinfo2().hblks
    block = libc.malloc(size)
    during = libc.mallinfo2().hblks
    libc.free(block)
    return during > before

libc.free(libc.malloc(8 << 20))  # freeing an mmapped 8 MiB block raises glibc's dynamic threshold to 8 MiB
out = {"default": mmapped(2 << 20)}
with StreamingPolicy() as applied:
    out.update(applied=applied, policy=mmapped(2 << 20), small=mmapped(512 << 10))
out["after"] = mmapped(2 << 20)
print(json.dumps(out))
"""


@pytest.mark.skipif(allocator.glibc() is None, reason="glibc only")
def test_under_the_policy_large_buffers_are_mmapped_on_glibc():
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True)
    out = __import__("json").loads(done.stdout.strip().splitlines()[-1])
    assert out == {"default": False, "applied": True, "policy": True, "small": False, "after": False}


def test_elsewhere_the_policy_is_a_no_op(monkeypatch, caplog):
    monkeypatch.setattr(allocator, "glibc", lambda: None)
    assert allocator.set_thresholds(1 << 20, 1 << 20) is False
    assert allocator.trim() is False
    with caplog.at_level(logging.DEBUG, logger="sparsegpt.core.allocator"), allocator.StreamingPolicy() as applied:
        assert applied is False
    assert "allocator left as it is" in caplog.text


@pytest.mark.skipif(allocator.glibc() is None, reason="glibc only")
def test_the_streamed_pass_applies_it(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="sparsegpt.core.allocator"), pytest.raises(UserError):
        prune_streamed(tmp_path / "absent", None, PruneConfig(), tmp_path / "out")
    assert "glibc mmap threshold 1024 KiB, trim threshold 128 KiB for the streamed pass" in caplog.text
