"""fedpeft.flower: fedpeft's protocols on Flower (``flwr``), from a laptop simulation to real machines.

Optional extra: ``pip install "fedpeft[flower]"`` (``flwr[simulation]>=1.42,<2``); only this package imports flwr.

- :func:`client_app` / :class:`ClientHandlers` (:mod:`.client`): the ``ClientApp`` of one method; personal state in a
  node's state folder or ``context.state`` (:mod:`.node_store`).
- :class:`ProtocolStrategy` (:mod:`.strategy`): the one strategy, around any protocol's server, one message per node
  per round; ``PersonalizedFedAvg`` and ``PFedPGStrategy`` are its 0.1 names. Nodes by partition id (:mod:`.registry`).
- :func:`server_app` (:mod:`.server`): the ``ServerApp`` with the per-client report.
- :mod:`.wire`: record keys, state dicts as ``ArrayRecord``, reading a reply.

See docs/flower.md.
"""

try:
    import flwr  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError('fedpeft.flower needs Flower: pip install "fedpeft[flower]"  (flwr[simulation]>=1.42,<2)') from e

from ..fed import frozen_fingerprint
from ..protocols import StaleMessage
from .client import ClientHandlers, client_app
from .server import server_app, write_report
from .strategy import PersonalizedFedAvg, PFedPGStrategy, ProtocolStrategy
from .wire import from_record, parse_evaluation, parse_reply, partition, payload_bytes, to_record

__all__ = ["ClientHandlers", "PFedPGStrategy", "PersonalizedFedAvg", "ProtocolStrategy", "StaleMessage", "client_app",
           "from_record", "frozen_fingerprint", "parse_evaluation", "parse_reply", "partition", "payload_bytes",
           "server_app", "to_record", "write_report"]
