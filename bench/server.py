"""The benchmark's server process: a real sidecar plus a no-op method on the same gRPC server.

Run by bench.run as ``python -m bench.server --state-dir DIR``. It prints one JSON line
(``{"port", "token", "pids", "metrics_ports"}``) once it is serving, then runs until SIGINT,
SIGTERM or end of stdin; the last means an orphaned server exits when its parent dies.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

from bench.workload import AGENT, EXAMPLE_POLICIES, GRANT, NOOP_SERVICE
from sidecar import supervisor
from sidecar.app import App, freeze_startup_heap
from sidecar.config import Address, Settings
from sidecar.errors import PolicyLoadError
from sidecar.keystore import load_or_create
from tokens import issue

EXIT_START_FAILED = 1


async def _noop(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    """Answer nothing: the baseline is the server stack's own cost (HTTP/2, grpc, asyncio)."""
    return b""


def noop_handler() -> grpc.GenericRpcHandler:
    """``/proviso.bench.v1.BenchService/Noop``, raw bytes in and out like the real services."""
    return grpc.method_handlers_generic_handler(
        NOOP_SERVICE, {"Noop": grpc.unary_unary_rpc_method_handler(_noop)}
    )


def noop_handlers() -> list[grpc.GenericRpcHandler]:
    """The extra handlers of every worker process (a module-level function: it is pickled)."""
    return [noop_handler()]


def serve_workers(policies: Path, state_dir: Path, token_ttl: int, workers: int) -> int:
    """``proviso serve --workers N`` with the no-op in every worker: announce, wait, stop."""
    settings = Settings(
        policies=policies,
        listen=Address("127.0.0.1", 0),
        metrics_listen=Address("127.0.0.1", 0),
        state_dir=state_dir,
        log_level="WARNING",
        workers=workers,
    )
    try:
        started = supervisor.start_workers(settings, noop_handlers)
    except supervisor.WorkerStartError as exc:
        print(f"bench.server: cannot start: {exc}", file=sys.stderr, flush=True)
        return EXIT_START_FAILED
    try:
        token = issue(
            load_or_create(state_dir).active,
            issuer=settings.token_issuer,
            subject=AGENT,
            audience=settings.audience,
            grants=(GRANT,),
            ttl_seconds=token_ttl,
            now=int(time.time()),
        )
        ready = {
            "port": started[0].grpc_port,
            "token": token,
            "pids": [worker.pid for worker in started],
            "metrics_ports": [worker.metrics_port for worker in started],
        }
        print(json.dumps(ready), flush=True)
        stop = threading.Event()  # set by the stdin thread; a signal only sets a flag: an
        signalled: list[int] = []  # Event.set() in a handler can deadlock on the Event's lock
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda signum, _: signalled.append(signum))
        threading.Thread(target=_set_on_eof, args=(stop,), daemon=True).start()
        while not stop.wait(0.2) and not signalled:
            if not all(worker.process.is_alive() for worker in started):
                print("bench.server: a worker exited", file=sys.stderr, flush=True)
                return EXIT_START_FAILED
    finally:
        supervisor.stop_workers(started)
    return 0


def _set_on_eof(stop: threading.Event) -> None:
    with contextlib.suppress(OSError, ValueError):
        sys.stdin.buffer.read()
    stop.set()


def _stop_on_eof(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    """Block until stdin closes (the parent exited or let go of us), then stop the server."""
    with contextlib.suppress(OSError, ValueError):
        sys.stdin.buffer.read()
    with contextlib.suppress(RuntimeError):  # the loop may already be closed
        loop.call_soon_threadsafe(stop.set)


async def serve(policies: Path, state_dir: Path, token_ttl: int) -> int:
    """Start the sidecar with the no-op handler, announce it, and wait to be stopped."""
    settings = Settings(
        policies=policies,
        listen=Address("127.0.0.1", 0),
        metrics_listen=Address("127.0.0.1", 0),
        state_dir=state_dir,
        log_level="WARNING",
    )
    try:
        app = await App.start(settings, extra_handlers=[noop_handler()])
    except (PolicyLoadError, OSError) as exc:
        print(f"bench.server: cannot start: {exc}", file=sys.stderr, flush=True)
        return EXIT_START_FAILED
    freeze_startup_heap()  # as `proviso serve` does
    try:
        # Signed by the sidecar's own active key, like tests/conftest.py: the bench measures
        # Check, not minting, and a real agent reuses one token for its whole task.
        token = issue(
            app.keys.active,
            issuer=settings.token_issuer,
            subject=AGENT,
            audience=settings.audience,
            grants=(GRANT,),
            ttl_seconds=token_ttl,
            now=int(time.time()),
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        threading.Thread(target=_stop_on_eof, args=(loop, stop), daemon=True).start()
        ready = {
            "port": app.grpc_port,
            "token": token,
            "pids": [os.getpid()],
            "metrics_ports": [app.http.port],
        }
        print(json.dumps(ready), flush=True)
        await stop.wait()
    finally:
        await app.stop(grace_seconds=1.0)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Parse flags and serve until stopped."""
    parser = argparse.ArgumentParser(prog="python -m bench.server", description=__doc__)
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--policies", type=Path, default=EXAMPLE_POLICIES)
    parser.add_argument("--token-ttl", type=int, default=900, help="seconds")
    parser.add_argument("--workers", type=int, default=1, help="worker processes")
    args = parser.parse_args(argv)
    if args.workers > 1:
        return serve_workers(args.policies, args.state_dir, args.token_ttl, args.workers)
    return asyncio.run(serve(args.policies, args.state_dir, args.token_ttl))


if __name__ == "__main__":
    sys.exit(main())
