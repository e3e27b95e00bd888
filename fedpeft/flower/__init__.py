"""fedpeft.flower: fedpeft's protocols on Flower (``flwr``), from a laptop simulation to real machines.

Optional extra: ``pip install "fedpeft[flower]"`` (``flwr[simulation]>=1.42,<2``); flwr is imported only here.

- :func:`client_app` (``ClientHandlers``): the ``ClientApp`` of one method: model built per message, shared state from
  the message, personal state in ``context.state`` stamped with its round, replies with exactly the upload keys.
- :class:`PersonalizedFedAvg` / :class:`PFedPGStrategy` (``ProtocolStrategy``): ``flwr.serverapp.strategy.Strategy``
  subclasses around a protocol's server: registration by partition id, seeded sampling, screened replies in
  partition-id order, per-client metrics.
- :func:`server_app`: the ``ServerApp`` that picks the strategy and writes the per-client report.
- :mod:`.records` / :mod:`.node`: state dicts on the wire (``ArrayRecord`` by key, float32) and in ``context.state``.

See docs/flower.md.
"""

try:
    import flwr  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError('fedpeft.flower needs Flower: pip install "fedpeft[flower]"  (flwr[simulation]>=1.42,<2)') from e

from .client import ClientHandlers, client_app, frozen_fingerprint
from .node import StaleMessage, partition
from .records import from_record, payload_bytes, to_record
from .server import server_app, write_report
from .strategy import PersonalizedFedAvg, PFedPGStrategy, ProtocolStrategy

__all__ = [
    "ClientHandlers",
    "PFedPGStrategy",
    "PersonalizedFedAvg",
    "ProtocolStrategy",
    "StaleMessage",
    "client_app",
    "from_record",
    "frozen_fingerprint",
    "partition",
    "payload_bytes",
    "server_app",
    "to_record",
    "write_report",
]
