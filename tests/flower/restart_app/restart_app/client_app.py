"""The ClientApp: personal state in ``node_config["state-dir"]`` (each SuperNode is started with one)."""

from fedpeft.flower import client_app

from .task import build_model, load_data, protocol, trainer

app = client_app(protocol(), build_model, load_data, trainer=trainer())
