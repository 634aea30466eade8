"""``python -m offload demo``: a FastAPI server stalls under CPU-bound work, then does not.

An application of offload, not part of its API: nothing in the library imports this
package, and its modules may change in any release. Their names are plain because
they are programs addressed by name on command lines (``uvicorn offload.demo.app:app``,
``python -m offload.demo.load``), not because they are public:

- :mod:`.command`: the command line, the run of the phases, the child processes' output;
- :mod:`.children`: starting and stopping the child processes, the uvicorn server among them;
- :mod:`.app`: the example FastAPI app the server runs;
- :mod:`.load`: the load generator, a process of its own;
- :mod:`.report`: the progress bar, the table and the chart;
- :mod:`.work`: the CPU-bound work every mode serves.

This module imports nothing: offload's workers import :mod:`.work` through it.
"""
