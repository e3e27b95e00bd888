"""The example app (examples/flower) visibly learns: after its default rounds every client is far above chance.

Run with the in-process engine on the example's own ``build_model``, ``load_data``, ``trainer`` and run config (the
Flower engines give the same numbers: tests/flower/test_engine_equality.py, test_one_message.py)."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "examples" / "flower"


@pytest.mark.parametrize("clients", [2, 3])
def test_example_clients_end_far_above_chance(clients, monkeypatch):
    pytest.importorskip("sklearn")
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    monkeypatch.syspath_prepend(str(APP))
    sys.modules.pop("fedpeft_example.task", None)
    from fedpeft_example import task

    from fedpeft.protocols import Federation

    rounds = tomllib.loads((APP / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]["num-server-rounds"]
    ctxs = [types.SimpleNamespace(node_config={"partition-id": i, "num-partitions": clients}, run_config={})
            for i in range(clients)]
    data = [task.load_data(c) for c in ctxs]
    torch.manual_seed(task.SEED)
    fed = Federation(task.METHOD, task.build_model(ctxs[0]), [d[0] for d in data], test_data=[d[1] for d in data],
                     trainer=task.trainer(), seed=task.SEED)
    fed.run(rounds)
    accs = fed.history[-1].deployed
    assert len(accs) == clients and min(accs) >= 0.6, accs  # chance is 0.1 on 10 classes
