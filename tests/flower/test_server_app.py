"""``server_app`` on the one-thread runtime: it discovers C from the nodes, runs the method, writes the report."""

from __future__ import annotations

import json

import pytest
from flower_harness import (
    LocalGrid,
    flower_task,  # noqa: F401  (autouse fixture)
    node_context,
)
from flower_worlds import NODE_IDS, SEED, build, client_data, oracle, trainer
from flwr.app import Context, RecordDict

from fedpeft.flower import client_app, server_app
from fedpeft.flower import server as server_module
from fedpeft.protocols import RoundLog


@pytest.mark.parametrize("method", ["FedVPT", "pFedPG"])
def test_server_app_runs_the_method_and_writes_the_benchmarks_report(method, tmp_path, monkeypatch):
    data = client_data(3)
    app = client_app(method, lambda c: build(method), lambda c: data[int(c.node_config["partition-id"])],
                     trainer=trainer())
    grid = LocalGrid(app, {n: node_context(n, p, 3) for p, n in enumerate(NODE_IDS[:3])})
    got = []
    path, log = tmp_path / "report.json", tmp_path / "rounds.jsonl"
    written = []  # the report on disk after each write: rewritten after every round, before the run ends
    real_write = server_module.write_report
    monkeypatch.setattr(server_module, "write_report",
                        lambda p, r: (real_write(p, r), written.append(json.loads(path.read_text())["curve"]))[0])
    server = server_app(method, lambda c: build(method), num_rounds=2, seed=SEED, report=path,
                        round_log=log, on_report=got.append, registration_timeout=2.0)
    server(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}))
    report = json.loads(path.read_text())
    assert report == json.loads(json.dumps(got[0], default=str))
    assert RoundLog.read(log) == report["rounds"]  # one line per round, the same records
    assert [len(c) for c in written] == [1, 2, 2]  # after round 1, after round 2, at the end
    ref = oracle(method)
    ref.run(2)
    assert report["accuracy"] == ref.history[-1].deployed
    assert report["curve_clients"] == [r.deployed for r in ref.history]
    assert report["curve"] == pytest.approx([sum(r.deployed) / 3 for r in ref.history])
    assert report["name"] == method and report["engine"]["name"] == "flower"
    model = build(method)
    assert report["communicated"] == model.prompts.numel()  # the prompts, in both methods
    assert report["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert report["server"] == (0 if method == "FedVPT" else sum(p.numel() for p in ref.server.generator.parameters()))
    assert [r["accepted"] for r in report["rounds"]] == [[0, 1, 2], [0, 1, 2]]
    assert all(k.startswith("model.head.") for k in report["personal_keys"])


def test_run_config_overrides_the_arguments():
    data = client_data(2)
    app = client_app("FedVPT", lambda c: build("FedVPT"), lambda c: data[int(c.node_config["partition-id"])],
                     trainer=trainer())
    grid = LocalGrid(app, {n: node_context(n, p, 2) for p, n in enumerate(NODE_IDS[:2])})
    got = []
    server = server_app("FedVPT", lambda c: build("FedVPT"), num_rounds=5, on_report=got.append)
    server(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                         run_config={"num-server-rounds": 1, "fraction-train": 0.5, "num-partitions": 2}))
    (only,) = got[0]["rounds"]
    assert len(only["participants"]) == 1
    assert only["without_personal"] == sorted({0, 1} - set(only["participants"]))
