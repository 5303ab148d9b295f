"""Shared fixtures: a tiny real model (random weights, real tokenizer) and a local Ray."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# Every process a test starts (Ray's, HAProxy, vLLM engines, CLI subprocesses) inherits this,
# which is how the session finds what it left behind.
SESSION_MARK = f"RAYPOST_TEST_SESSION={os.getpid()}"
os.environ["RAYPOST_TEST_SESSION"] = str(os.getpid())


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from raypost.models.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the session (2 CPUs, as on the CI machine). Only what we start is stopped."""
    import ray

    started = False
    if not ray.is_initialized():
        os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
        from raypost.runtime import LOCAL_RAY_CONFIG

        ray.init(num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False, log_to_driver=False,
                 _system_config=LOCAL_RAY_CONFIG)
        started = True
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture
def fake_openai():
    """The base URL of a live fake OpenAI endpoint (tests/fake_openai.py)."""
    from tests.fake_openai import serve

    server, url = serve()
    yield url
    server.shutdown()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} not present")
    return SHARED_DATA


def session_processes() -> list[tuple[int, str]]:
    """Live processes (other than this one) that carry this session's mark."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if SESSION_MARK.encode() in (proc / "environ").read_bytes().split(b"\0"):
                if (proc / "stat").read_text().split(") ", 1)[1].startswith("Z"):
                    continue  # exited, waiting for its parent to read its status
                found.append((int(proc.name), (proc / "cmdline").read_bytes().replace(b"\0", b" ")[:100].decode(errors="replace")))
        except OSError:
            continue
    return found


@pytest.fixture(scope="session", autouse=True)
def no_leftover_processes_or_shared_memory():
    """Tests leave no Ray, HAProxy or vLLM process and no /dev/shm segment behind (CI machines
    are shared). Torn down last, after the session's Ray has shut down."""
    import signal
    import time

    from raypost.engines.shm_cleanup import removing_orphaned_segments

    with removing_orphaned_segments(wait_seconds=10.0):
        yield
    deadline = time.monotonic() + 20  # Ray's agents exit a few seconds after their raylet
    while (left := session_processes()) and time.monotonic() < deadline:
        time.sleep(1)
    for pid, _ in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    assert not left, f"processes left behind by the tests (killed now): {left}"
