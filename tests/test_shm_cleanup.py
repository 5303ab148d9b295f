"""Orphaned /dev/shm segments (what killed vLLM processes leave) are removed; live ones are not."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from raypost.engines.shm_cleanup import SHM_DIR, remove_orphaned_segments, removing_orphaned_segments

pytestmark = pytest.mark.skipif(not SHM_DIR.is_dir(), reason="needs /dev/shm")

# Like vLLM's message queue: a named segment the creator keeps mapped and does not hand to
# Python's resource tracker, so nothing unlinks it when the creator is killed.
HOLDER = """
import sys, time
from multiprocessing import resource_tracker, shared_memory
segment = shared_memory.SharedMemory(create=True, size=1 << 20)
resource_tracker.unregister(segment._name, "shared_memory")
segment.buf[:5] = b"hello"
print(segment.name, flush=True)
time.sleep(600)
"""


def start_holder() -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen([sys.executable, "-c", HOLDER], stdout=subprocess.PIPE, text=True)
    return process, process.stdout.readline().strip().lstrip("/")


def test_removes_segments_of_killed_processes_and_keeps_live_and_older_ones():
    older, older_name = start_holder()
    older.kill()
    older.wait()
    time.sleep(1.1)
    since = time.time()
    killed, killed_name = start_holder()
    alive, alive_name = start_holder()
    try:
        killed.kill()  # SIGKILL: no chance to unlink, as when Ray kills an engine actor
        killed.wait()
        assert (SHM_DIR / killed_name).exists()

        removed = remove_orphaned_segments(since)

        assert killed_name in removed and alive_name not in removed and older_name not in removed
        assert not (SHM_DIR / killed_name).exists()
        assert (SHM_DIR / alive_name).exists(), "a segment a live process maps must stay"
        assert (SHM_DIR / older_name).exists(), "a segment from before `since` is not ours to remove"
    finally:
        alive.kill()
        alive.wait()
        for name in (killed_name, alive_name, older_name):
            Path(SHM_DIR / name).unlink(missing_ok=True)


def test_waits_for_a_process_that_is_exiting():
    since = time.time() - 1.0
    holder, name = start_holder()
    try:
        subprocess.Popen(["sh", "-c", f"sleep 1; kill -9 {holder.pid}"])
        started = time.monotonic()
        removed = remove_orphaned_segments(since, wait_seconds=20.0)
        assert name in removed
        assert time.monotonic() - started < 15
    finally:
        holder.kill()
        holder.wait()
        (SHM_DIR / name).unlink(missing_ok=True)


def test_a_block_that_starts_and_kills_an_engine_leaves_no_segment():
    with removing_orphaned_segments(wait_seconds=5.0):
        holder, name = start_holder()
        holder.kill()
        holder.wait()
        assert (SHM_DIR / name).exists()
    assert not (SHM_DIR / name).exists()


def test_loky_semaphores_go_only_when_their_creator_is_gone(tmp_path):
    """A killed vLLM replica also leaves joblib's `sem.loky-<pid>-*`; only the dead pid's goes."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    since = time.time() - 1.0
    orphan = tmp_path / f"sem.loky-{dead.pid}-abcd"
    live = tmp_path / f"sem.loky-{os.getpid()}-efgh"
    for entry in (orphan, live):
        entry.write_bytes(b"\0" * 32)
    assert remove_orphaned_segments(since, shm_dir=tmp_path) == [orphan.name]
    assert live.exists() and not orphan.exists()
