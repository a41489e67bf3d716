"""Shared fixtures: the real public data in ../shared/data and one Ray instance per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MSK_SHARED_DATA", REPO.parent / "shared" / "data"))

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("OMP_NUM_THREADS", "2")
# No test reaches the Hugging Face hub: a hub id not in the cache fails at once instead of
# retrying for ~40 s (read when huggingface_hub is first imported, so set before any test).
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (real public DICOMs and BTXRD metadata); skips where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA} (set MSK_SHARED_DATA to its path)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole test session (2 CPUs, no dashboard)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, configure_logging=False,
                 log_to_driver=False, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    yield ray
    ray.shutdown()


@pytest.fixture
def pseudonym_key(monkeypatch) -> bytes:
    """A fixed pseudonymisation key in the environment (never a real one)."""
    key = b"test-key-0123456789abcdef"
    monkeypatch.setenv("MSK_PSEUDONYM_KEY", key.decode())
    return key


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models: one torch thread avoids oversubscription on a 2-core machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
