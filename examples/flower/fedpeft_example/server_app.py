"""The ServerApp: the method's server (pFedPG: the prompt generator) and the per-client report."""

from fedpeft.flower import server_app

from .task import METHOD, build_model

app = server_app(METHOD, build_model)
