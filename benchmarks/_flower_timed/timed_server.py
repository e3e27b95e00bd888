"""The example's ServerApp with the strategy's round steps time-stamped into ``$FEDPEFT_BENCH_TIMINGS``."""

import json
import os
import time

from fedpeft_example.task import METHOD, build_model

from fedpeft.flower import server_app
from fedpeft.flower import strategy as _strategy


def _stamp(name, fn):
    def wrapper(self, server_round, *args, **kwargs):
        t = time.time()
        try:
            return fn(self, server_round, *args, **kwargs)
        finally:
            path = os.environ.get("FEDPEFT_BENCH_TIMINGS")
            if path:
                with open(path, "a") as f:
                    f.write(json.dumps({"kind": "server." + name, "round": server_round, "enter": t,
                                        "exit": time.time()}) + "\n")
    return wrapper


_cls = _strategy.ProtocolStrategy
for _name in ("configure_train", "aggregate_train", "configure_evaluate", "aggregate_evaluate"):
    setattr(_cls, _name, _stamp(_name, getattr(_cls, _name)))

app = server_app(METHOD, build_model)
