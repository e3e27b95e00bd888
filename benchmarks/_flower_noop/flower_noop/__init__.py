"""A no-op Flower app: the floor a round costs on the Deployment Engine (``bench_flower.py --deployed``)."""
