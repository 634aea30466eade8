"""Soak offload: many concurrent callers, every kind of outcome, then look for leaks.

Callers (``--concurrency``) share ``--calls`` calls drawn from a seeded RNG: normal
calls (exact result checked), user exceptions, deadlines, caller cancellations and
worker crashes (about 1%), to a process pool of 2 workers and a thread pool of 8.
Every call must end once, as planned; afterwards no child process, thread or file
descriptor may be left over and RSS may have grown by less than ``--rss-limit-mb``.
See ``_soak.py`` for the details. Exit code 1 if any of that fails.

Run from the repository root::

    python benchmarks/soak.py --calls 20000 --seed 1 --concurrency 64
    python benchmarks/soak.py --calls 2000 --backend trio
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
# _funcs and the offload checkout, importable here and (offload passes sys.path on)
# in the workers.
sys.path[:0] = [p for p in (str(BENCH_DIR), str(REPO_ROOT)) if p not in sys.path]

import _funcs  # noqa: E402
import _soak  # noqa: E402
import anyio  # noqa: E402

FUNCS = _soak.Funcs(
    add=_funcs.add,
    boom=_funcs.boom,
    boom_type=_funcs.Boom,
    sleep_then=_funcs.sleep_then,
    exit_now=_funcs.exit_now,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")
    parser.add_argument("--process-workers", type=int, default=2)
    parser.add_argument("--thread-workers", type=int, default=8)
    parser.add_argument("--rss-limit-mb", type=float, default=10.0)
    parser.add_argument(
        "--logs", action="store_true", help="show offload's warnings (one per crash)"
    )
    args = parser.parse_args(argv)
    if not args.logs:
        logging.getLogger("offload").setLevel(logging.CRITICAL)

    async def run() -> _soak.SoakReport:
        return await _soak.soak(
            FUNCS,
            calls=args.calls,
            seed=args.seed,
            backend=args.backend,
            concurrency=args.concurrency,
            settings=_soak.soak_settings(args.process_workers, args.thread_workers),
            rss_limit=int(args.rss_limit_mb * 2**20),
        )

    report = anyio.run(run, backend=args.backend)
    print(report.format(), flush=True)
    return 1 if report.failures() else 0


if __name__ == "__main__":
    sys.exit(main())
