"""The oversubscription warning counts the processes the server really starts."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from .conftest import assert_gone, start_server

WARNING = "worker processes per server x"


@pytest.mark.parametrize(
    ("kind", "args", "servers", "source"),
    [
        pytest.param("uvicorn", ("--workers", "2"), 2, "uvicorn --workers", id="uvicorn-2"),
        pytest.param(
            "uvicorn-standard", ("--workers", "2"), 2, "uvicorn --workers", id="uvicorn-uvloop-2"
        ),
        pytest.param(
            "hypercorn",
            ("--workers", "2", "--worker-class", "trio"),
            2,
            "hypercorn --workers",
            id="hypercorn-trio-2",
        ),
        pytest.param("gunicorn", ("-w", "2"), 2, "gunicorn --workers", id="gunicorn-2"),
        pytest.param("hypercorn", ("--workers", "2"), 2, "hypercorn --workers", id="hypercorn-2"),
        pytest.param("uvicorn", (), 1, "uvicorn --workers", id="uvicorn-1"),
        pytest.param("hypercorn", (), 1, "hypercorn --workers", id="hypercorn-1"),
    ],
)
def test_warning_counts_server_processes(
    tmp_path: Path, kind: str, args: tuple[str, ...], servers: int, source: str
) -> None:
    # One CPU for the server and its workers: one process worker per server process
    # is enough to oversubscribe it once there are two of them.
    cpu = min(os.sched_getaffinity(0))
    log = tmp_path / "server.log"
    # What the command line overrides; without --workers, uvicorn would obey it.
    env = {"WEB_CONCURRENCY": "7"} if args else {}
    server = start_server(kind, env, "tests.web.count_app:app", args=args, log=log, cpus={cpu})
    seen: dict[int, dict[str, object]] = {}
    try:
        deadline = time.monotonic() + 20
        while len(seen) < servers:  # each server process answers, sooner or later
            assert time.monotonic() < deadline, f"server processes seen: {sorted(seen)}"
            # A new connection each time: the server spreads connections, not requests.
            answer = httpx.get(f"{server.url}/servers", timeout=10).json()
            seen[answer.pop("pid")] = answer
    finally:
        pids = server.worker_pids()
        assert server.stop() in (0, -signal.SIGTERM)
        assert_gone(pids)
    assert all(answer == {"servers": servers, "source": source} for answer in seen.values()), seen
    text = log.read_text()
    if servers > 1:
        assert f"1 {WARNING} {servers} server processes ({source}) = {servers}" in text, text
    else:
        assert WARNING not in text, text
