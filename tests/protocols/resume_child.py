"""A federation in its own process, for the kill tests: ``python resume_child.py METHOD CKPT_DIR ROUNDS``.

Builds the same seeded model and data as the test's oracle run, then runs (or resumes) to ``ROUNDS`` rounds with a
checkpoint folder and a round log beside it (``rounds.jsonl``); the test kills this process with SIGKILL while it runs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
torch.set_num_threads(1)

from protocol_models import client_data, model_for  # noqa: E402

from fedpeft.protocols import Federation, LocalTrainer  # noqa: E402

TRAINER = LocalTrainer(epochs=1, batch_size=6, lr=1e-2, lr_backbone=1e-3)


def federation(method: str, checkpoint_dir=None, server_optimizer=None, round_log=None) -> Federation:
    from fedpeft import protocols

    protocol = protocols.get(method, server_optimizer="Adam") if method == "pFedPG" else method
    torch.manual_seed(0)
    return Federation(protocol, model_for(method), client_data(3, n=12, seed=1),
                      test_data=client_data(3, n=12, seed=2), trainer=TRAINER, seed=5, fraction=0.67,
                      checkpoint_dir=checkpoint_dir, round_log=round_log)


if __name__ == "__main__":
    method, ckpt, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
    fed = federation(method, ckpt, round_log=Path(ckpt).parent / "rounds.jsonl")
    left = rounds - len(fed.history)
    if left > 0:
        fed.run(left)
