"""A complete Flower app on fedpeft: ``flwr run examples/flower`` (see README.md)."""
