"""A Flower runtime in one thread, for unit tests without Ray: a ``Grid`` that runs a ``ClientApp`` per node.

It does what Flower's simulation engine does for each message (``flwr/server/superlink/fleet/vce/vce_api.py``,
``worker``): fetch the node's ``Context``, run the ClientApp on a copy, store the updated context if the app returned,
and turn an exception into an error reply (``ErrorCode.CLIENT_APP_RAISED_EXCEPTION``) leaving the context as it was.
Messages are built with the public ``Message`` constructor; ``TaskIdentity`` is set by the ``flower_task`` fixture
(FLOWER.md pitfall 4: a ``Message`` needs a run id, which only a Flower runtime sets).

Test modules import the autouse fixture ``flower_task`` from here. Test hooks: ``late`` node ids whose replies are lost (the node still saves its context, FLOWER.md pitfall 6),
``tamper(node_id, reply) -> reply`` to corrupt a reply on the wire, and ``log`` of every message handled.
"""

from __future__ import annotations

import copy
import uuid
from typing import Callable, Dict, Iterable, List, Optional, Set

import pytest

pytest.importorskip("flwr")

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

RUN_ID = 4242
SERVER_NODE_ID = 1
RAISED = 2  # flwr.common.constant.ErrorCode.CLIENT_APP_RAISED_EXCEPTION


@pytest.fixture(autouse=True)
def flower_task():
    """Set ``TaskIdentity`` as a Flower runtime does (FLOWER.md pitfall 4), and restore it afterwards."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, RUN_ID, SERVER_NODE_ID
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def node_context(node_id: int, partition_id: int, num_partitions: int, run_config: Optional[dict] = None) -> Context:
    return Context(
        run_id=RUN_ID,
        node_id=node_id,
        node_config={"partition-id": partition_id, "num-partitions": num_partitions},
        state=RecordDict(),
        run_config=dict(run_config or {}),
    )


class LocalGrid(Grid):
    """``contexts``: node id → that node's ``Context``; every message goes to ``app(message, context)``."""

    def __init__(self, app: ClientApp, contexts: Dict[int, Context]) -> None:
        self.app = app
        self.contexts = contexts
        self.late: Set[int] = set()
        self.tamper: Optional[Callable[[int, Message], Message]] = None
        self.log: List[Message] = []
        self._replies: Dict[str, Message] = {}
        self._run = Run.create_empty(run_id=RUN_ID)

    # ---- Grid -----------------------------------------------------------------------------------------------------
    def set_run(self, run: Run) -> None:  # pragma: no cover - not used
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id, message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = mid = str(uuid.uuid4())
            self.log.append(msg)
            reply = self._handle(msg)
            if msg.metadata.dst_node_id not in self.late:
                self._replies[mid] = reply
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(m) for m in list(message_ids) if m in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: Optional[float] = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))

    # ---- the runtime's per-message work ---------------------------------------------------------------------------
    def _handle(self, msg: Message) -> Message:
        node = msg.metadata.dst_node_id
        work = copy.deepcopy(self.contexts[node])
        try:
            reply = self.app(msg, work)
        except Exception as ex:  # what Flower's worker does: an error reply, the context left as it was
            reply = Message(Error(code=RAISED, reason=f"{type(ex).__name__}: {ex}"), reply_to=msg)
        else:
            self.contexts[node] = work
        reply.metadata.__dict__["_message_id"] = str(uuid.uuid4())
        if self.tamper is not None and reply.has_content():
            reply = self.tamper(node, reply)
        return reply
