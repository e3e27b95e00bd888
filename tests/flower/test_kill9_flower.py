"""Issue 27: the Flower engine (ProtocolStrategy on a LocalGrid, nodes with state folders) SIGKILLed at >= 20 random
moments (kill_loop), each time restarted as a new ServerApp with new SuperNodes on the same folders: the round log
ends with every round exactly once, equal to the checkpoint's history, with the per-client numbers of an
uninterrupted in-process run; no temporary file is left anywhere (checkpoint, log, node state, node cache)."""

from __future__ import annotations

from flower_harness import flower_task  # noqa: F401  (autouse fixture)
from flower_worlds import oracle, world
from kill9_harness import kill_loop, leftovers, logged_exactly_once
from test_hardening_resume import _strategy

from fedpeft.protocols import RoundLog, load_checkpoint

FOREVER = 10_000


def test_kill_9_at_random_moments_leaves_every_round_in_the_log_exactly_once(tmp_path):
    ckpt, log = tmp_path / "ckpt", tmp_path / "logs" / "rounds.jsonl"

    def work(final):
        w = world("FedVPT")
        for i, node in enumerate(w.grid.contexts):
            w.grid.contexts[node].node_config["state-dir"] = str(tmp_path / f"node{i}")
        s = _strategy(ckpt, round_log=RoundLog(log, append=True, tensorboard=False))
        before = load_checkpoint(ckpt)
        s.start(w.grid, num_rounds=(0 if before is None else before.round) + 2 if final else FOREVER, timeout=10)

    fed = oracle("FedVPT")  # also warms this process up: its forked children start at once
    fed.run(1)
    delays = kill_loop(work, kills=20, seed=27, max_delay=1.5)
    assert len(delays) >= 20
    rows = logged_exactly_once(log, ckpt)
    done = len(rows)
    print(f"{len(delays)} kills, {done} rounds")
    fed.run(done - 1)
    assert [r["deployed"] for r in rows] == [r.deployed for r in fed.history]
    assert [{int(k): v for k, v in r["train_loss"].items()} for r in rows] == [r.train_loss for r in fed.history]
    assert leftovers(tmp_path) == []
