"""``python -m offload info``: what this machine and environment give the pools.

An application of the library, as the demo is: nothing in the core imports it. It
starts no pool and leaves no process behind; see :mod:`.command`.
"""
