"""Timing wrappers for ``bench_flower.py --deployed``: the example app with every phase of a message timed."""
