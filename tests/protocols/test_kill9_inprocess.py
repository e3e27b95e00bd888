"""Issue 27: the in-process engine SIGKILLed at >= 20 random moments (kill_loop), each time restarted from its
checkpoint folder: the round log ends with every round exactly once, equal to the checkpoint's history and, apart
from wall-clock times, to a run never interrupted; no temporary file is left."""

from __future__ import annotations

from kill9_harness import kill_loop, leftovers, logged_exactly_once
from test_hardening_checkpoint import fed

from fedpeft.protocols import RoundLog

FOREVER = 10_000


def _strip(rows):
    return [{k: v for k, v in r.items() if k != "wall_s"} for r in rows]


def test_kill_9_at_random_moments_leaves_every_round_in_the_log_exactly_once(tmp_path):
    ckpt, log = tmp_path / "ckpt", tmp_path / "logs" / "rounds.jsonl"

    def work(final):
        f = fed("FedVPT", ckpt, round_log=RoundLog(log, append=True, tensorboard=False))
        f.run(2 if final else FOREVER - len(f.history))

    oracle = fed("FedVPT")  # also warms this process up: its forked children start at once
    oracle.run(1)
    delays = kill_loop(work, kills=20, seed=27, max_delay=1.0)
    assert len(delays) >= 20
    rows = logged_exactly_once(log, ckpt)
    done = len(rows)
    print(f"{len(delays)} kills, {done} rounds")
    oracle.run(done - 1)
    assert _strip(rows) == _strip([r.as_dict() for r in oracle.history])
    assert leftovers(tmp_path) == []
    assert sorted(p.name for p in ckpt.iterdir()) == [".fedpeft.lock", "checkpoint.json",
                                                     f"tensors-r{done:06d}.safetensors"]
