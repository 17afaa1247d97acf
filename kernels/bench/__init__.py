"""Benchmarks of the kernels (``gwtn_dist.kernels.bench``); run as scripts, never collected by
pytest."""
