"""The process pool: supervised worker processes, one socket each.

The data flow of one call (each box names the module that does it)::

    |=============== parent: the event loop's thread ===============|== worker ==|

    caller task: ProcessPool._execute                      (pool.py)
      |
      | encode the function and arguments                  (call_encoding.py)
      |   pickle 5, large buffers out of band              (framing.py, buffers.py)
      v
    wait for a free worker, first come first served        (handoff.py)
      |   at most max_pending wait, then PoolOverloaded
      |   a small call is sent by whoever frees the worker (exchange.WaitingCall)
      v
    send the frame over the worker's socketpair            (pool.py,
      |   sendmsg of header, pickle and buffers,             worker_handle.py,
      |   under IOV_MAX, resumed after partial sends         sending.py)
      |   buffers of 4 MiB or more stay REMOTE: copied
      |   into the worker's memory with process_vm_writev  (exchange.py,
      |                                                     remote_buffers.py,
      |                                                     cross_memory.py)
      +-------------------------------------------------------> main loop
                                                               (worker.py):
                                                               read the call,
                                                               run it, encode
                                                               the outcome
      +<------------------------------------------------------ log records (LOG
      | each handled by the logger of its name, as it          frames, during the
      | arrives, in the caller's task (logs.py)                call; worker_logs.py)
      +<------------------------------------------------------ (status, value,
      |                                                         seconds it ran)
      | read the reply; REMOTE results copied out of the
      | worker's memory with process_vm_readv             (pool.py, exchange.py)
      v
    decode: the result, or the exception raised with the
    worker's traceback as its cause; large ``bytes`` in a
    helper thread, slow decodes on the loop counted        (call_encoding.py,
                                                            exchange.LoopDecoder)

    watcher task, one per worker: the pidfd becomes readable when the worker exits,
    the pool ends its process group and starts a replacement (supervision.py,
    launch.py)

Worker processes are started by one long-lived thread (spawner.py), below the event
loop (scheduling.py), with the parent's ``sys.path`` on their command line, and told
their limits and initializer in a first message (launch.py).

Deadline passed, or caller cancelled, while a worker runs the call
    The caller gets ``OffloadTimeout`` (or its cancellation) at once. The worker is
    somewhere in the call: it gets SIGTERM, then SIGKILL after ``KILL_GRACE``; its
    watcher sees it exit and a replacement starts in the background. Other calls are
    not touched. A call still waiting for a worker just leaves the line (handoff.py).

Worker crash (segfault, ``os._exit``, killed, out of memory)
    The caller reading its reply sees EOF, waits briefly for the exit status, and
    raises ``WorkerCrashed`` with it, the function, and what the worker's fault
    handler wrote to its crash report (crash_reports.py); only that call fails. A
    worker still alive then is stopped. The watcher reaps the worker, kills what is
    left of its process group, and starts a replacement, backing off while starts
    fail (``PoolStartError`` for the waiting calls once ``start_timeout`` has passed
    without a worker).

A stream (``Executor.stream``, streams.py)
    The call frame carries the stream's buffer; the worker answers STARTED, then one
    ITEM frame per item while it has credit, which the parent grants (MORE) as the
    consumer takes items, then an ordinary answer. The parent's last frame is CLOSE:
    read between items, it closes the generator in the worker (its ``finally`` runs
    there); sent after the answer, it tells the worker the stream is over. Items
    travel in the channel, never as REMOTE buffers.

Recycling (``max_tasks_per_worker``, ``max_memory_per_worker``)
    After a call, a worker past its limit is retired: its channel is shut down, it
    exits cleanly (SIGKILL after a grace otherwise), and a replacement starts; for the
    call limit, one call early, so that capacity has no gap (worker_handle.py, pool.py,
    supervision.py).

Shutdown (``Pool.aclose``, ../base.py)
    New calls get ``PoolClosed``; calls in flight may finish until the drain deadline,
    then their workers are killed. Idle workers are retired, the rest killed, and the
    write end of the death pipe closed: a worker still there reads EOF and exits.
    Should the parent die, however it dies, its workers die too (``PR_SET_PDEATHSIG``
    or the death pipe), and each worker's guard ends its process group
    (worker_lifetime.py).

Workers import ``offload._pools.process.worker`` at start, and with it this package:
this file imports nothing, and the modules a worker loads (worker.py, worker_errors.py,
worker_lifetime.py, framing.py, buffers.py, remote_buffers.py, sending.py,
worker_logs.py; worker_log_handler.py once it forwards logs) import neither anyio nor
pydantic.
"""
