"""The process pool: supervised worker processes (see :mod:`.pool`).

Workers import :mod:`.worker` from this package at start: this file imports nothing.
"""
