"""fedpeft.protocols: every method's federated protocol, written once, engine-agnostic (plain torch + ``fedpeft.fed``).

A *protocol* says what a client loads, trains, uploads and keeps, and what the server does with the replies. The
in-process engine (:class:`Federation`, the benchmark) and the Flower integration (``fedpeft.flower``) both call it,
so they cannot drift apart. Design:

- Stateless objects. ``protocol = protocols.get("FedPerfix")`` holds configuration only; every call takes the model
  and returns plain ``Dict[str, Tensor]``, so personal state round-trips through any store (Flower's
  ``context.state``) and a model may be built fresh per call.
- Client side: ``protocol.client_update(model, shared=, personal=, data=, round=, client_id=, seed=, trainer=,
  eval_data=) -> ClientResult(upload, num_examples, personal, metrics)``; ``protocol.deploy(model, shared=,
  personal=, ...)`` loads the client's deployed model. ``personal=None`` means the model's initial values, which must
  then be a deterministic function of (seed, client id): build models under a fixed seed.
- Key sets: ``personal_keys(model)`` (never sent), ``upload_keys(model)`` (sent every round; pFedPG: the trained
  prompts P̃), ``download_keys(model)``; personal ∪ upload = the trainable keys. The one call for "what does a client
  of method X send": :func:`upload_keys` / :func:`upload_state`.
- Server side: ``server = protocol.make_server(model, num_clients=C, seed=s)``, a :class:`Server`, with ``server.payloads(ids) -> {id: state}``
  (FedAvg-like: the same shared state; pFedPG: each client's own ``gen(n)`` from one batched call),
  ``server.deployment(ids)`` and ``server.update(replies) -> ServerReport``; replies are ``(client_id, upload,
  weight)``, screened (keys, shapes, dtypes, finite values, weight, known and unique ids; a bad one is dropped with a
  logged and returned reason, server state untouched) and processed in client-id order, so engines that deliver
  replies in different orders give bit-identical results.
- Local training: a *trainer* ``trainer(model, data, task: LocalTask) -> loss``; :class:`LocalTrainer` is the default
  (seeded batch order per (seed, round, client, phase), fresh optimizer per call, FedPGP's loss via the protocol's
  ``loss_fn``). Any user callable with that signature works.
- Partial participation: :func:`sample_clients` (seeded, at least one client), used by every engine.

Public names::

    METHODS, REGISTRY, Method, method(name), get(method, **options), method_costs(protocol, model, server),
    upload_keys(model, method), upload_state(model, method)
    Protocol, SharedPersonal(patterns, ...), FedAvgFT, PFedPG, AveragingServer, PFedPGServer
    ClientResult, Reply, Rejection, Diverged, ServerReport, screen_replies
    RoundBook (a round's record, log and checkpoint, for every engine), Checkpoint, load_checkpoint, save_checkpoint
    ClientStateFile, ClientStateError, StaleMessage (a client's personal state on disk)
    LocalTask, LocalTrainer, Trainer, LossFn, batch_seed, cross_entropy_loss, evaluate, fedpgp_loss
    sample_clients, Federation, RoundRecord, RoundLog, Server

See docs/protocols.md.
"""

from .checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from .client_state import ClientStateError, ClientStateFile, StaleMessage
from .inprocess import Federation
from .methods import (
    METHODS,
    REGISTRY,
    Method,
    fedpgp_loss,
    get,
    method,
    method_costs,
    upload_keys,
    upload_state,
)
from .pfedpg import PFedPG, PFedPGServer
from .protocol import Phase, Protocol
from .records import ClientResult, Diverged, Rejection, Reply, RoundRecord, ServerReport, diverged
from .roundlog import RoundLog
from .rounds import RoundBook
from .sampling import sample_clients
from .screening import screen_replies
from .server import Server
from .shared_personal import AveragingServer, FedAvgFT, SharedPersonal
from .training import LocalTask, LocalTrainer, LossFn, Trainer, batch_seed, cross_entropy_loss, evaluate

__all__ = [
    "METHODS",
    "REGISTRY",
    "AveragingServer",
    "Checkpoint",
    "CheckpointError",
    "ClientResult",
    "ClientStateError",
    "ClientStateFile",
    "Diverged",
    "FedAvgFT",
    "Federation",
    "LocalTask",
    "LocalTrainer",
    "LossFn",
    "Method",
    "PFedPG",
    "PFedPGServer",
    "Phase",
    "Protocol",
    "Rejection",
    "Reply",
    "RoundBook",
    "RoundLog",
    "RoundRecord",
    "Server",
    "ServerReport",
    "SharedPersonal",
    "StaleMessage",
    "Trainer",
    "batch_seed",
    "cross_entropy_loss",
    "diverged",
    "evaluate",
    "fedpgp_loss",
    "get",
    "load_checkpoint",
    "method",
    "method_costs",
    "sample_clients",
    "save_checkpoint",
    "screen_replies",
    "upload_keys",
    "upload_state",
]
