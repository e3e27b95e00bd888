"""The example's ClientApp with each phase of every message timed (``bench_flower.py --deployed``).

Every message appends one JSON line to ``$FEDPEFT_BENCH_TIMINGS``: the wall-clock times (``time.time()``) when the
server created the message, when this process started, when the app module's imports began and ended, when the
handler began and ended, and the seconds spent in ``build_model``, ``load_data``, training and evaluation.
"""

import time

T_MODULE = time.time()  # the Flower runtime is imported and has fetched the task; the app's imports start here

import json  # noqa: E402
import os  # noqa: E402

from fedpeft_example import task  # noqa: E402

from fedpeft.flower import client_app  # noqa: E402

T_IMPORTED = time.time()
_spent: dict = {}


def _timed(name, fn):
    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            _spent[name] = _spent.get(name, 0.0) + time.perf_counter() - t
    return wrapper


class _Trainer:
    def __init__(self, inner):
        self.inner = inner
        self.evaluate = _timed("eval", inner.evaluate)

    def __call__(self, *args, **kwargs):
        return _timed("train", self.inner)(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _process_start() -> float:
    with open("/proc/self/stat") as f:
        ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/stat") as f:
        boot = next(float(line.split()[1]) for line in f if line.startswith("btime"))
    return boot + ticks / os.sysconf("SC_CLK_TCK")


app = client_app(task.METHOD, _timed("build", task.build_model), _timed("data", task.load_data),
                 trainer=_Trainer(task.trainer()))


def _wrap(kind, fn):
    def handler(msg, context):
        _spent.clear()
        enter = time.time()
        try:
            return fn(msg, context)
        finally:
            out = time.time()
            path = os.environ.get("FEDPEFT_BENCH_TIMINGS")
            if path:
                cfg = msg.content.config_records.get("config")
                line = {"kind": kind, "partition": context.node_config.get("partition-id"),
                        "round": None if cfg is None else cfg.get("server-round"),
                        "created": msg.metadata.created_at, "process": _process_start(), "module": T_MODULE,
                        "imported": T_IMPORTED, "enter": enter, "exit": out, **_spent}
                with open(path, "a") as f:
                    f.write(json.dumps(line) + "\n")
    return handler


app._registered_funcs = {k: _wrap(k, f) for k, f in app._registered_funcs.items()}
