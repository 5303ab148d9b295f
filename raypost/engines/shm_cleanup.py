"""Remove the /dev/shm segments that killed vLLM processes leave behind (and the small loky
semaphores that a killed vLLM replica leaves too).

vLLM's shared-memory message queues (`psm_*`, 160–250 MiB each on CPU) are unlinked by the
process that made them when it exits cleanly. Ray ends engine actors with a kill, so the
segments of a `ray.data.llm` stage or a Serve replica stay in /dev/shm until reboot. A segment
is only removed when it was written after `since` (so it belongs to work raypost started) and no
live process maps it or holds it open (so its creator is gone and nobody can use it again).
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

logger = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
SEGMENT_PREFIX = "psm_"
# joblib's loky semaphores (32 bytes, named after the creating pid): a killed vLLM replica leaves
# one; removed only when that pid is gone
SEMAPHORE_PREFIX = "sem.loky-"


def segment_clock() -> float:
    """Now, as a `since` for segments made from here on (tmpfs mtimes are coarser than time.time())."""
    return time.time() - 1.0


@contextmanager
def removing_orphaned_segments(wait_seconds: float) -> Iterator[None]:
    """Around work that starts vLLM processes: afterwards, remove the segments they left."""
    since = segment_clock()
    try:
        yield
    finally:
        remove_orphaned_segments(since, wait_seconds=wait_seconds)


def segments_in_use() -> set[str]:
    """Names of /dev/shm entries that some live process has mapped or open."""
    used: set[str] = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for line in (proc / "maps").read_text().splitlines():
                if "/dev/shm/" in line:
                    used.add(line.rsplit("/dev/shm/", 1)[1].split(" ")[0])
            for fd in (proc / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("/dev/shm/"):
                    used.add(target[len("/dev/shm/"):].split(" ")[0])
        except (OSError, ValueError):  # the process ended while we looked, or is not ours to read
            continue
    return used


def remove_orphaned_segments(since: float, wait_seconds: float = 0.0, shm_dir: Path = SHM_DIR) -> list[str]:
    """Unlink `psm_*` segments modified at or after `since` (epoch seconds) that no process uses.

    Processes that were just told to exit may still hold theirs: with `wait_seconds`, look again
    until every recent segment is gone or that much time has passed.
    """
    deadline = time.monotonic() + wait_seconds
    removed: list[str] = []
    while True:
        still_used = _remove_unused(_recent_segments(shm_dir, since), removed)
        if not still_used or time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    if removed:
        logger.info("removed %d orphaned shared-memory segment(s) left by ended vLLM processes", len(removed))
    return removed


def _recent_segments(shm_dir: Path, since: float) -> list[Path]:
    if not shm_dir.is_dir():
        return []
    recent = []
    entries = [*shm_dir.glob(f"{SEGMENT_PREFIX}*"),
               *(e for e in shm_dir.glob(f"{SEMAPHORE_PREFIX}*") if not _creator_alive(e.name))]
    for entry in entries:
        try:
            if entry.stat().st_mtime >= since:
                recent.append(entry)
        except OSError:
            continue
    return recent


def _creator_alive(name: str) -> bool:
    try:
        pid = int(name[len(SEMAPHORE_PREFIX):].split("-", 1)[0])
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (ValueError, PermissionError):  # not a name we understand, or someone else's process
        return True
    return True


def _remove_unused(candidates: list[Path], removed: list[str]) -> int:
    """Unlink the candidates nobody uses; return how many are still in use."""
    if not candidates:
        return 0
    used = segments_in_use()
    still_used = 0
    for entry in candidates:
        if entry.name in used:
            still_used += 1
            continue
        try:
            entry.unlink()
            removed.append(entry.name)
        except OSError:
            continue
    return still_used
