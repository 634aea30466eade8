"""The host process of a dask pool's embedded cluster.

Started by :class:`~offload._pools.dask.pool.DaskPool` with :func:`host_command`:
``python -P -c BOOT CONFIG PATH...``, CONFIG a JSON object (see :func:`host_config`),
PATH the application's ``sys.path``, installed before anything is imported. The
cluster's scheduler and nannies run here, on the loop thread of a synchronous
``LocalCluster``, not on the application's event loop: in the application's process
they held its loop for tens of milliseconds while they started.

::

    application ── async Client (on its event loop) ──tcp──┐
       │ stdin: held open while the pool lives             │
       │ report fd: one JSON line, the scheduler's address │
       └─ this process: scheduler + nannies  <─────────────┘
            └─ worker processes (multiprocessing spawn), one thread each

Its life:

- it dies with the application however that dies: ``PR_SET_PDEATHSIG`` (Linux) sends
  it SIGKILL when the thread that started it ends (offload's spawner thread, which
  lives as long as the process); otherwise stdin reaches EOF when the application's
  process ends, and the cluster is closed;
- the worker processes die with it however it dies: distributed starts each one as an
  ``AsyncProcess`` (``distributed/process.py``), which hands the child the read end of
  a pipe whose write end only this process holds; a thread in the child blocks on it
  and calls ``os._exit`` at EOF, which the kernel delivers when this process exits,
  SIGKILL included;
- it writes the scheduler's address and the cluster's credentials on the report fd
  once the cluster runs, then waits for EOF on stdin: the pool closes it when it
  stops. It then closes the cluster (bounded) and exits 0. A cluster that cannot
  start: the error on stderr, exit 1.

Whom it trusts:

- the cluster speaks TLS only, with a certificate made for it at start
  (``Security.temporary()``) that is both its authority and the only certificate
  it accepts: the scheduler, the nannies and the workers refuse every connection
  that does not present it (a plain connection fails its handshake). The key never
  touches a command line or a file of ours; the application's client gets it
  through the report pipe, which only the two processes hold;
- the HTTP servers that Dask runs beside them (on free loopback ports) serve the
  health check alone: no task names, no metrics;
- nothing is imported from the current directory: ``-P`` keeps it off ``sys.path``
  (Python 3.11+), and multiprocessing passes the flag on to the workers it spawns;
  the boot installs the application's path before its first import.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import traceback
from typing import Any

__all__ = ("host_command", "host_config", "main")

# ``sys`` is built in: importing it reads no directory.
_BOOT = "import sys; sys.path[:] = sys.argv[2:]; from offload._pools.dask.host import main; main()"

_PR_SET_PDEATHSIG = 1


def host_command(config: dict[str, Any]) -> list[str]:
    """The host's command line: this interpreter with the options it runs with (as
    multiprocessing passes them on), ``-P`` so that the current directory is never
    on its path, nor on its workers' (Python 3.11+), the boot, its configuration and
    the application's ``sys.path``."""
    # Private, but what multiprocessing's spawn uses for the same purpose.
    flags: list[str] = getattr(subprocess, "_args_from_interpreter_flags", list)()
    if sys.version_info >= (3, 11) and "-P" not in flags:
        flags.append("-P")
    return [sys.executable, *flags, "-c", _BOOT, json.dumps(config), *sys.path]


def host_config(
    *,
    n_workers: int,
    report_fd: int,
    close_timeout: float,
) -> dict[str, Any]:
    """The host's configuration, from the application's process."""
    return {
        "parent": os.getpid(),
        "n_workers": n_workers,
        "report_fd": report_fd,
        "close_timeout": close_timeout,
    }


def _die_with_parent(parent: int) -> None:
    if sys.platform == "linux":
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)  # the parent died before we could ask to die with it


def _start_cluster(config: dict[str, Any]) -> Any:
    import dask.config
    import distributed
    from distributed.security import Security

    # untyped: called through Any
    cluster_class: Any = distributed.LocalCluster
    security: Any = Security
    # The HTTP servers would tell anyone on the machine the cluster's tasks and
    # workers: the health check alone. (The nannies pass this configuration on to
    # their workers.)
    health = ["distributed.http.health"]
    overrides = {
        "distributed.scheduler.http.routes": health,
        "distributed.worker.http.routes": health,
    }
    with dask.config.set(overrides):
        return cluster_class(
            n_workers=int(config["n_workers"]),
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            security=security.temporary(),
            protocol="tls://",
            dashboard_address=None,
            scheduler_kwargs={
                # A crash is reported at once, never retried on another worker.
                "allowed_failures": 0,
                # The scheduler's HTTP server (health, metrics) runs even without a
                # dashboard: on loopback, on a free port, never a fixed 8787.
                "dashboard": False,
                "dashboard_address": "127.0.0.1:0",
            },
            silence_logs=logging.WARNING,
        )


def main() -> None:
    config = json.loads(sys.argv[1])
    # Ctrl-C in a terminal reaches the whole process group; the application decides
    # when its pool, and so this cluster, stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent(int(config["parent"]))
    report = os.fdopen(int(config["report_fd"]), "w")
    os.set_inheritable(report.fileno(), False)
    # The workers inherit fds 0-2: stdout and stderr stay the application's (a print
    # in a task lands where it did when the cluster lived in the application), stdin
    # becomes /dev/null and the lifeline moves to a descriptor they do not inherit.
    lifeline = os.dup(0)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    try:
        cluster = _start_cluster(config)
    except BaseException:
        traceback.print_exc()
        sys.stderr.write("offload: the embedded dask cluster could not start\n")
        sys.stderr.flush()
        os._exit(1)  # the threads of a half-started cluster must not keep us alive
    try:
        security = cluster.security
        credentials = {
            "ca": security.tls_ca_file,
            "cert": security.tls_client_cert,
            "key": security.tls_client_key,
        }
        report.write(json.dumps({"address": cluster.scheduler_address, **credentials}) + "\n")
        report.flush()
        report.close()
        while os.read(lifeline, 4096):
            pass
    finally:
        cluster.close(timeout=float(config["close_timeout"]))


if __name__ == "__main__":
    main()
