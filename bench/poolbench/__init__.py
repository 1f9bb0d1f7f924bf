"""The pieces of ``bench/pool_bench.py``: HTTP clients, the processes it starts, the
measurements, the pure summary, and the markdown report and plot written from it."""
