"""The cost-worker benchmark (issue 7): ceilings, a naive reference worker, the worker itself, latency,
memory, growth and budget evaluation, measured in one run on one machine. See ``bench/README.md``."""
