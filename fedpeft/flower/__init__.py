"""fedpeft.flower: fedpeft's protocols on Flower (``flwr``), from a laptop simulation to real machines.

Optional extra: ``pip install "fedpeft[flower]"`` (``flwr[simulation]>=1.42,<2``); flwr is imported only here.

- :func:`client_app` (``ClientHandlers``): the ``ClientApp`` of one method: model built per message, shared state from
  the message, personal state stamped with its round (on the node's disk with a ``state-dir``, else in
  ``context.state``), replies with exactly the upload keys.
- :class:`ProtocolStrategy`: the one ``flwr.serverapp.strategy.Strategy``, around any protocol's server: registration
  by partition id, seeded sampling, replies read once (:func:`parse_reply`) and screened by the server in partition-id
  order, one :class:`~fedpeft.protocols.RoundRecord` per round (``history``, the round log). ``PersonalizedFedAvg`` and
  ``PFedPGStrategy`` are its 0.1 names, kept as thin aliases.
- :func:`server_app`: the ``ServerApp`` that runs the strategy and rewrites the per-client report every round.
- :mod:`.records` / :mod:`.node`: record keys, state dicts on the wire (``ArrayRecord`` by key, float32), reading a
  reply; personal state in ``context.state``.
- Surviving restarts: :mod:`.node_state` / :mod:`.durable` (a client's personal state in one safetensors file per
  (run, partition) under ``<state-dir>/fedpeft/``; the ClientApp's refusals of bad messages), :mod:`.resume` (the
  strategy's checkpoint and resume; ``checkpoint_dir``), the registry's rejoin at every round's start.

See docs/flower.md.
"""

try:
    import flwr  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError('fedpeft.flower needs Flower: pip install "fedpeft[flower]"  (flwr[simulation]>=1.42,<2)') from e

from .client import ClientHandlers, client_app, frozen_fingerprint
from .node import StaleMessage, partition
from .records import from_record, parse_evaluation, parse_reply, payload_bytes, to_record
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
    "parse_evaluation",
    "parse_reply",
    "partition",
    "payload_bytes",
    "server_app",
    "to_record",
    "write_report",
]
