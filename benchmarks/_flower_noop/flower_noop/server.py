"""The no-op ServerApp: per round, one train message with ``payload-floats`` float32 values to every node, replies
pulled every 0.2 s (as fedpeft's ServerApp pulls them), each exchange time-stamped into ``$FEDPEFT_BENCH_TIMINGS``
(``{"kind": "noop.exchange", "round", "enter", "exit"}``; ``{"kind": "noop.done"}`` at the end). Imports only flwr and
numpy."""

import json
import os
import time

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


def _stamp(line: dict) -> None:
    path = os.environ.get("FEDPEFT_BENCH_TIMINGS")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(line) + "\n")


def _exchange(grid: Grid, messages: list, timeout: float) -> list:
    pending = {i for i in grid.push_messages(messages) if i}
    end, replies = time.monotonic() + timeout, []
    while pending and time.monotonic() < end:
        got = list(grid.pull_messages(pending))
        replies.extend(got)
        pending.difference_update(m.metadata.reply_to_message_id for m in got)
        if pending:
            time.sleep(0.2)
    return replies


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    rounds, parts = int(cfg["num-server-rounds"]), int(cfg["num-partitions"])
    deadline = time.monotonic() + float(cfg["registration-timeout"])
    while len(list(grid.get_node_ids())) < parts and time.monotonic() < deadline:
        time.sleep(0.5)
    nodes = sorted(grid.get_node_ids())
    arrays = ArrayRecord({"x": Array(np.zeros(int(cfg["payload-floats"]), dtype=np.float32))})
    for r in range(1, rounds + 1):
        msgs = [Message(RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": r})}), n,
                        MessageType.TRAIN, group_id=str(r)) for n in nodes]
        t = time.time()
        replies = _exchange(grid, msgs, float(cfg["round-timeout"]))
        _stamp({"kind": "noop.exchange", "round": r, "enter": t, "exit": time.time(), "replies": len(replies)})
    _stamp({"kind": "noop.done", "run": context.run_id})
