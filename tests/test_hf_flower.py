"""fedpeft.flower, unchanged, on a transformers ViT: the ClientApp and ProtocolStrategy on the one-thread Flower
runtime (``flower_harness.LocalGrid``, no Ray) give the in-process engine's rounds bit for bit, as for timm."""

from __future__ import annotations

import pytest

pytest.importorskip("flwr")

import torch
from flower_harness import LocalGrid, flower_task, node_context  # noqa: F401  (autouse fixture)
from flower_worlds import client_data, trainer
from hf_oracle import pair

from fedpeft.flower import ProtocolStrategy, client_app
from fedpeft.protocols import Federation
from fedpeft.protocols import get as get_protocol
from fedpeft.protocols import method as method_entry

NODES = [9_000_000_011, 9_000_000_007, 9_000_000_003]


def _build(method: str) -> torch.nn.Module:
    _, hf = pair("dinov2_reg", "Dinov2WithRegistersForImageClassification")
    torch.manual_seed(0)
    return method_entry(method).build(hf.float(), num_prompts=2, bottleneck=8, rank=2)


@pytest.mark.parametrize("method", ["FedVPT", "FedPerfix", "pFedPG"])
def test_flower_rounds_on_a_transformers_model_equal_the_in_process_engine(method):
    data = client_data(3)
    protocol = get_protocol(method)
    app = client_app(protocol, lambda context: _build(method),
                     lambda context: data[int(context.node_config["partition-id"])], trainer=trainer())
    contexts = {}
    for c, node in enumerate(NODES):
        ctx = node_context(node, 0, 3)
        ctx.node_config = {"partition-id": c, "num-partitions": 3}
        contexts[node] = ctx
    strategy = ProtocolStrategy(protocol, _build(method), num_partitions=3, seed=0, registration_timeout=1.0,
                                min_nodes=3)
    strategy.start(LocalGrid(app, contexts), num_rounds=2, timeout=10)
    ref = Federation(get_protocol(method), _build(method), [d[0] for d in data], test_data=[d[1] for d in data],
                     trainer=trainer(), seed=0)
    ref.run(2)
    assert len(strategy.history) == 2
    for got, want in zip(strategy.history, ref.history):
        assert got.server.accepted == want.server.accepted == [0, 1, 2]
        assert got.deployed == want.deployed and got.train_loss == want.train_loss
