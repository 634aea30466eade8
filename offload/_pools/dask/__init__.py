"""The dask pool: calls run as tasks on a Dask distributed cluster (see :mod:`.pool`).

Dask workers import :mod:`.task` from this package: this file imports nothing.
"""
