"""The dask pool: calls run as tasks on a Dask distributed cluster.

::

    caller task ── pickle the call (fn, arguments) into one blob
        ├─ scatter large arguments (one round trip, only when there are some)
        ├─ client.submit(invoke, topic, key, blob, ...) ──> scheduler ──> a worker:
        │      invoke (task.py) logs "key started" on the scheduler, unpickles
        │      the blob, runs it, timed, pickles its result
        └─ await the future <── scheduler: "started" event (the queue wait's end),
                                then done ── the result pickled, and the seconds
           unpickle the result                                         it ran
    cancelled or past its deadline: the future is cancelled in the background; with
    hard_cancel, the worker running it is restarted too
    its worker died before it started (it waited there behind another task): sent again

The asynchronous client lives on the Offloader's event loop: it is created when the
pool starts and closed when it stops. With no scheduler address the pool first
starts an embedded ``LocalCluster`` of ``max_workers`` single-threaded worker
processes on 127.0.0.1 in a host process of its own, so that its scheduler and
nannies never run on the application's event loop; the client then connects to it
by address, as to any cluster, and the host stops with the pool::

    application (event loop: the client) ── stdin, report fd ──> host process
                                                                  (scheduler, nannies)
                                                                   └─> worker processes

The embedded cluster speaks TLS with a certificate made for it at start, which the
host hands to the pool through the report pipe: no other client gets in.

Failures are mapped at one place, ``DaskCalls._outcome``; the scheduler gone (or
the embedded host) is :class:`~offload.ClusterUnavailable`, at once, never a wait:
while the client is not connected, calls are refused, and once Dask's client has
given up reconnecting (after its connect timeout), the pool connects a new one in
the background.

What Dask cannot do, and what the pool does instead (see docs/dask.md):

- a running task cannot be interrupted: cancelling its future only drops its result;
  ``hard_cancel`` restarts the worker process running it;
- a task whose worker dies is retried elsewhere up to the scheduler's
  ``allowed-failures`` times: the embedded cluster allows none, so a crash reaches the
  caller at once as :class:`~offload.WorkerCrashed`; an external scheduler is the
  operator's, and the pool warns at start when it retries;
- a worker is handed more tasks than it has threads, and when it dies the scheduler
  fails them all alike: the "started" events tell the pool which of them ran, and
  it sends the others again;
- a worker that cannot unpickle a task breaks its connection to the scheduler: the
  call travels pickled inside the task, and is unpickled by the task itself
  (``task.invoke``), where a missing module fails that call alone;
- the user's pickling hooks may raise anything, down to a ``SystemExit``, which in
  Dask's serialization ends a worker process, or breaks the client's connection in
  the application: the task pickles its result itself (its buffers as memoryviews,
  which Dask sends as frames of their own), and the pool unpickles it, each under a
  guard that fails that call alone; a ``SystemExit`` raised by the function arrives
  as :class:`~offload.CallAborted`.

The modules, from the pool down to what runs elsewhere:

- ``pool.py``: :class:`DaskPool`, its start, stop and occupancy;
- ``calls.py``: one call's path: pickle, scatter, submit, outcome, cancel;
- ``streams.py``: one stream's path: its queue on the scheduler, the consumer's side;
- ``connection.py``: the client, its version check, and outages of its scheduler;
- ``embedded.py``: the embedded cluster's host process, started and stopped, and
  the address and credentials it reports;
- ``versions.py``: which package versions must agree across the cluster;
- ``host.py``: what runs in the host process (the scheduler and nannies);
- ``task.py``: what runs on a worker or on the scheduler;
- ``stream_task.py``: what a stream's task runs on a worker.

Only ``pool.py`` and what it imports need distributed, and they are imported only
when a pool of kind dask starts. Dask workers import ``task.py``, whose
:func:`invoke` they unpickle by reference: this file must import nothing.
"""
