"""Fixtures for fedpeft.flower's tests: Flower's task identity (so ``Message`` can be built without a runtime), tiny
models and client data. Every model is built under a fixed seed, as a ClientApp builds it on every message."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("flwr")

sys.path.insert(0, str(Path(__file__).parent))  # harness.py, worlds.py importable as plain modules


@pytest.fixture(autouse=True)
def flower_task():
    """Set ``TaskIdentity`` as a Flower runtime does (FLOWER.md pitfall 4), and restore it afterwards."""
    from flwr.supercore.task_identity import TaskIdentity
    from harness import RUN_ID, SERVER_NODE_ID

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, RUN_ID, SERVER_NODE_ID
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved
