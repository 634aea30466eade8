"""``python -m offload demo``: a FastAPI server stalls under CPU-bound work, then does not.

An application of offload, not part of its API: nothing in the library imports this
package, and its modules may change in any release. Their names are plain because
they are programs addressed by name on command lines (``uvicorn offload.demo.app:app``,
``python -m offload.demo.load``), not because they are public.
"""
