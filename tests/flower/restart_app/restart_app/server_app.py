"""The ServerApp, checkpointing into the run config's ``checkpoint-dir``.

Test hook: with the environment variable ``FEDPEFT_TEST_GATE`` set to a folder (the test sets it on the SuperLink,
whose ServerApp processes inherit it), the server pauses after each round r: it writes ``<folder>/done-<r>`` and waits
for ``<folder>/go-<r>``, so the test can kill and restart processes between two rounds.
"""

import os
import time
from pathlib import Path

from fedpeft.flower import server_app

from .task import build_model, protocol


def gate(record) -> None:
    folder = os.environ.get("FEDPEFT_TEST_GATE")
    if not folder:
        return
    (Path(folder) / f"done-{record.round}").write_text("")
    deadline = time.monotonic() + 300
    while not (Path(folder) / f"go-{record.round}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)


app = server_app(protocol(), build_model, on_round=gate)
