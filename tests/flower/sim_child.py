"""Flower's simulation (Ray) in its own process, for the kill test: ``python sim_child.py METHOD OUT ROUNDS``.

The ServerApp checkpoints into ``OUT/ckpt``, appends to ``OUT/rounds.jsonl`` and writes ``OUT/report.json`` after every
round; the
ClientApp keeps every client's personal state in ``OUT/nodes`` (``client_app(state_dir=)``: the simulation's
``node_config`` cannot carry a ``state-dir``). Started again with the same ``OUT``, it resumes.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402

torch.set_num_threads(1)

from flower_worlds import build, client_data, trainer  # noqa: E402
from flwr.simulation import run_simulation  # noqa: E402

from fedpeft.flower import client_app, server_app  # noqa: E402
from fedpeft.protocols import get as get_protocol  # noqa: E402

if __name__ == "__main__":
    method, out, rounds = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    data = client_data(3)

    def build_model(context):
        return build(method)

    def load_data(context):
        return data[int(context.node_config["partition-id"])]

    client = client_app(get_protocol(method), build_model, load_data, trainer=trainer(), state_dir=str(out / "nodes"))
    server = server_app(get_protocol(method), build_model, num_partitions=3, num_rounds=rounds, seed=0,
                        registration_timeout=120.0, report=str(out / "report.json"), checkpoint_dir=str(out / "ckpt"),
                        round_log=str(out / "rounds.jsonl"))
    backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
               "init_args": {"num_cpus": 2, "include_dashboard": False}}
    os.environ["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])
    run_simulation(server_app=server, client_app=client, num_supernodes=3, backend_config=backend)
