"""The example's ServerApp with every exchange time-stamped into ``$FEDPEFT_BENCH_TIMINGS``.

``ProtocolStrategy.start`` owns its loop (one message per round), so the stamps sit on the grid: each
``send_and_receive`` appends ``{"kind": "server.exchange", "types": [message types], "round": the highest
"server-round" of its train messages (else of its messages), "enter", "exit"}``.
"""

import json
import os
import time

from fedpeft_example.task import METHOD, build_model

from fedpeft.flower import server as _server
from fedpeft.flower import server_app

_send = _server.FastGrid.send_and_receive


def _timed(self, messages, *, timeout=None):
    messages = list(messages)
    t = time.time()
    try:
        return _send(self, messages, timeout=timeout)
    finally:
        path = os.environ.get("FEDPEFT_BENCH_TIMINGS")
        if path:
            types = sorted({m.metadata.message_type for m in messages})
            rounds = [int(m.content.config_records["config"].get("server-round", 0)) for m in messages
                      if "config" in m.content.config_records and m.metadata.message_type in ("train", "evaluate")]
            trains = [int(m.content.config_records["config"].get("server-round", 0)) for m in messages
                      if m.metadata.message_type == "train"]
            line = {"kind": "server.exchange", "types": types, "round": max(trains or rounds or [None]),
                    "enter": t, "exit": time.time()}
            with open(path, "a") as f:
                f.write(json.dumps(line) + "\n")


_server.FastGrid.send_and_receive = _timed

app = server_app(METHOD, build_model)
