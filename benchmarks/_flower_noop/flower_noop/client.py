"""The no-op ClientApp: imports only flwr and numpy; every train message is answered with its own arrays."""

import numpy as np  # noqa: F401  (what a minimal numerical app imports)
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    metrics = MetricRecord({"partition-id": int(context.node_config.get("partition-id", -1))})
    return Message(RecordDict({"arrays": msg.content.array_records["arrays"], "metrics": metrics}), reply_to=msg)
