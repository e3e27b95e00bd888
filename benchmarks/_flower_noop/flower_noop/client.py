"""The no-op ClientApp: imports only flwr and numpy; every train message is answered with its own arrays.

``extra-imports`` in the run config (comma-separated module names, default none) are imported by the handler, to
measure what importing, say, torch costs a message on top of Flower's floor (``bench_flower.py --noop-imports``).
"""

import importlib

import numpy as np  # noqa: F401  (what a minimal numerical app imports)
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    for name in str(context.run_config.get("extra-imports", "")).split(","):
        if name.strip():
            importlib.import_module(name.strip())
    metrics = MetricRecord({"partition-id": int(context.node_config.get("partition-id", -1))})
    return Message(RecordDict({"arrays": msg.content.array_records["arrays"], "metrics": metrics}), reply_to=msg)
