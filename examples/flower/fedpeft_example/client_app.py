"""The ClientApp: the method's client step; personal parameters stay in the node's ``context.state``."""

from fedpeft.flower import client_app

from .task import METHOD, build_model, load_data, trainer

app = client_app(METHOD, build_model, load_data, trainer=trainer())
