"""Shared fixtures: a tiny real model (random weights, real tokenizer) and a local Ray."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


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
        ray.init(num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False, log_to_driver=False)
        started = True
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} not present")
    return SHARED_DATA


@pytest.fixture(scope="session", autouse=True)
def no_leftover_shared_memory():
    """vLLM engines started by tests must not leave /dev/shm segments behind (CI machines are shared)."""
    from raypost.engines.shm_cleanup import removing_orphaned_segments

    with removing_orphaned_segments(wait_seconds=10.0):
        yield
