"""Issue 27, a Mapping that shows one thing to ``items()`` and another to ``[]``: validation and accumulation must
read the same snapshot, so NaN never reaches ``fed.Averager`` or ``AveragingServer`` (oracle: the plain mean of the
values ``items()`` shows)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedpeft import fed
from fedpeft.protocols import AveragingServer


class TwoFaced(Mapping):
    """``items()``/iteration show finite tensors; ``[key]`` returns NaN."""

    def __init__(self, shown):
        self.shown = shown

    def __getitem__(self, key):
        return torch.full_like(self.shown[key], float("nan"))

    def __iter__(self):
        return iter(self.shown)

    def __len__(self):
        return len(self.shown)

    def items(self):
        return self.shown.items()


def test_averager_reads_a_state_once():
    a = {"w": torch.tensor([1.0, 2.0])}
    b = TwoFaced({"w": torch.tensor([3.0, 6.0])})
    acc = fed.Averager()
    acc.add(a)
    acc.add(b)
    assert torch.equal(acc.result()["w"], torch.tensor([2.0, 4.0]))  # main: NaN


def test_averaging_server_reads_an_upload_once():
    server = AveragingServer({"w": torch.zeros(2)}, num_clients=2)
    report = server.update([(0, {"w": torch.tensor([1.0, 2.0])}, 1.0),
                            (1, TwoFaced({"w": torch.tensor([3.0, 6.0])}), 1.0)])
    assert report.accepted == [0, 1]
    assert torch.equal(server.shared["w"], torch.tensor([2.0, 4.0]))  # main: NaN in the shared state
