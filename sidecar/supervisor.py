"""``serve --workers N``: N sidecar processes on one port, so Check uses every core.

CPython runs one thread of Python at a time, so one process answers Checks on one core. Here
the parent starts N worker processes (multiprocessing, spawn: gRPC does not survive fork). Each
is a whole sidecar (``App``) bound to the same port with SO_REUSEPORT, so the kernel spreads
incoming connections over them. They share the state store (SQLite: every Check's transaction
is ``BEGIN IMMEDIATE``, exact across processes), the keys and the policy directory; each writes
its own audit chain (``decisions.w0.jsonl``, ``decisions.w1.jsonl``…: ``proviso audit verify``
checks every chain of the directory) and serves its own ``/metrics`` (on consecutive ports from
``--metrics-listen``, or each on a free port when that port is 0).

The parent only supervises: it forwards SIGTERM/SIGINT (graceful stop) and SIGHUP (policy
reload) to every worker, and if a worker dies it stops the others and exits non-zero, so the
process manager above it (systemd, Kubernetes) restarts the whole sidecar. A worker whose
parent disappears stops too.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

import grpc

from sidecar.audit.redaction import Redactor
from sidecar.audit.writer import refuse_if_in_use
from sidecar.config import Settings
from sidecar.errors import SidecarError
from sidecar.identity import DevIdentityProvider
from sidecar.keystore import load_or_create
from sidecar.observability import logging as json_logging
from sidecar.state.sqlite import SQLiteStore

log = logging.getLogger("proviso.supervisor")

START_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 30.0
HandlerFactory = Callable[[], Sequence[grpc.GenericRpcHandler]]
"""Extra gRPC handlers for every worker (the bench's no-op); a module-level function, so it can
be sent to a spawned process."""


class WorkerStartError(RuntimeError):
    """A worker did not start; the message has its reason."""


@dataclass(frozen=True, slots=True)
class Worker:
    """A started worker process and where it listens."""

    index: int
    process: BaseProcess
    pid: int
    grpc_port: int
    metrics_port: int
    audit_path: str
    policy_version: str
    channel: Connection
    """Held open: a worker stops by itself when it closes (this process died)."""


def prepare_state(settings: Settings) -> None:
    """Create what the workers share (keys, dev IdP, redaction key, the store's tables) once,
    before they start, so they never race to create them.

    Raises:
        AuditLogInUseError: a server already writes one of the workers' chains: refused before
            the store is migrated, which that (maybe older) server could not restart on.
    """
    settings.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    settings.audit_dir.mkdir(parents=True, exist_ok=True)
    # Every chain a server may be writing there: the workers' to be, a single server's
    # (``serve --workers 1``), and any other whose lock file exists (a server with more
    # workers). A probe, not a hold: a server starting in the instant between would still be
    # refused by its own chain lock, only after the migration.
    chains = {
        settings.for_worker(index, listen_port=0, metrics_port=0).audit_path
        for index in range(settings.workers)
    }
    chains.add(settings.audit_path)
    chains.update(lock.with_suffix("") for lock in settings.audit_dir.glob("*.lock"))
    for chain in sorted(chains):
        refuse_if_in_use(chain)
    load_or_create(settings.state_dir)
    if settings.dev_mode:
        DevIdentityProvider.load_or_create(settings.state_dir, settings.idp_audience)
    Redactor.load_or_create(settings.state_dir)
    SQLiteStore(settings.state_dir / "state.db").close()


def start_workers(settings: Settings, extra: HandlerFactory | None = None) -> list[Worker]:
    """Start ``settings.workers`` processes; worker 0 binds first (it picks the port if 0).

    Raises:
        WorkerStartError: a worker failed to start; those already started are stopped.
    """
    if settings.listen.port:
        _refuse_a_taken_port(settings.listen.host, settings.listen.port)
    with contextlib.suppress(ValueError):  # not the main thread: the caller handles signals
        # A started worker may ask for a reload (SIGHUP) before ``supervise`` forwards them;
        # the workers that start later load the bundle as it is then anyway.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    prepare_state(settings)
    context = multiprocessing.get_context("spawn")
    workers: list[Worker] = []
    port = settings.listen.port
    try:
        for index in range(settings.workers):
            base = settings.metrics_listen.port
            metrics_port = base + index if base else 0
            worker_settings = settings.for_worker(
                index, listen_port=port, metrics_port=metrics_port
            )
            parent_end, child_end = context.Pipe()
            process = context.Process(
                target=worker_main,
                args=(worker_settings, index, child_end, extra),
                name=f"proviso-worker-{index}",
                daemon=False,
            )
            process.start()
            child_end.close()
            if not parent_end.poll(START_TIMEOUT_SECONDS):
                raise WorkerStartError(f"worker {index} did not start in time")
            try:
                ready: dict[str, Any] = parent_end.recv()
            except EOFError:
                raise WorkerStartError(f"worker {index} exited while starting") from None
            if "error" in ready:
                raise WorkerStartError(f"worker {index}: {ready['error']}")
            port = int(ready["grpc_port"])
            workers.append(
                Worker(
                    index,
                    process,
                    int(ready["pid"]),
                    port,
                    int(ready["metrics_port"]),
                    str(ready["audit_path"]),
                    str(ready["policy_version"]),
                    parent_end,
                )
            )
    except BaseException:
        stop_workers(workers)
        raise
    return workers


def _refuse_a_taken_port(host: str, port: int) -> None:
    """Fail if anything listens on ``host:port`` already.

    The workers bind with SO_REUSEPORT, which also lets them join the port of another running
    sidecar (whose workers set it too): calls would then be spread over two servers with
    different keys, state and policy. A plain bind (no SO_REUSEPORT) fails while any other
    socket holds the port, so it is tried first.

    Raises:
        WorkerStartError: the address is taken (or cannot be bound at all).
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        raise WorkerStartError(f"cannot resolve {host}: {exc}") from None
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is no owner
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise WorkerStartError(f"{host}:{port} is in use by another process") from None
                raise WorkerStartError(f"cannot bind {host}:{port}: {exc.strerror}") from None


def signal_workers(workers: Sequence[Worker], signum: int) -> None:
    for worker in workers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker.pid, signum)


def stop_workers(workers: Sequence[Worker], timeout: float = STOP_TIMEOUT_SECONDS) -> list[int]:
    """SIGTERM every worker (each finishes its calls in flight), then kill stragglers.

    Returns the exit codes.
    """
    signal_workers(workers, signal.SIGTERM)
    for worker in workers:
        worker.process.join(timeout)
        if worker.process.is_alive():
            worker.process.kill()
            worker.process.join()
    return [worker.process.exitcode or 0 for worker in workers]


def supervise(workers: Sequence[Worker]) -> int:
    """Forward signals until SIGTERM/SIGINT or a worker's death; stop everyone; exit status.

    0 after a requested stop with every worker exiting cleanly, 1 otherwise.
    """
    requested = False

    def on_stop(signum: int, frame: object) -> None:
        # Only a flag: the handler runs in the main thread between any two bytecodes, and an
        # Event.set() here deadlocked when it came while the loop below held the Event's lock.
        nonlocal requested
        requested = True

    previous = {
        signal.SIGTERM: signal.signal(signal.SIGTERM, on_stop),
        signal.SIGINT: signal.signal(signal.SIGINT, on_stop),
        signal.SIGHUP: signal.signal(
            signal.SIGHUP, lambda signum, frame: signal_workers(workers, signal.SIGHUP)
        ),
    }
    try:
        while not requested:
            time.sleep(0.2)  # a signal cuts it short: its handler runs, then the sleep goes on
            dead = [w for w in workers if not w.process.is_alive()]
            if dead:
                log.error(
                    "a worker exited; stopping the others",
                    extra={"worker": dead[0].index, "exitcode": dead[0].process.exitcode},
                )
                break
    finally:
        codes = stop_workers(workers)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 0 if requested and not any(codes) else 1


def _hangup_parent(parent: int) -> Callable[[], None]:
    """Ask the supervisor to send SIGHUP to every worker: a ReloadPolicy RPC reaches one."""

    def hangup() -> None:
        if os.getppid() == parent:  # never signal whoever adopted us after the parent died
            os.kill(parent, signal.SIGHUP)

    return hangup


def worker_main(
    settings: Settings, index: int, channel: Connection, extra: HandlerFactory | None
) -> None:
    """A worker process: serve until SIGTERM/SIGINT or the parent goes away."""
    json_logging.configure(settings.log_level)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which stops us
    try:
        code = asyncio.run(_serve(settings, index, channel, extra))
    except Exception as exc:
        with contextlib.suppress(OSError, ValueError):
            known = isinstance(exc, SidecarError)  # says what is wrong in its own words
            channel.send({"error": str(exc) if known else f"{type(exc).__name__}: {exc}"})
        raise SystemExit(1) from None
    raise SystemExit(code)


async def _serve(
    settings: Settings, index: int, channel: Connection, extra: HandlerFactory | None
) -> int:
    from sidecar.app import App, freeze_startup_heap  # noqa: PLC0415 - in the worker, after logging

    app = await App.start(
        settings,
        extra_handlers=extra() if extra else (),
        reload_peers=_hangup_parent(os.getppid()),
    )
    freeze_startup_heap()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    app.reload_on_sighup()
    channel.send(
        {
            "pid": os.getpid(),
            "grpc_port": app.grpc_port,
            "metrics_port": app.http.port,
            "audit_path": str(settings.audit_path),
            "policy_version": app.policy.current.version,
        }
    )

    def watch_parent() -> None:
        with contextlib.suppress(EOFError, OSError):
            channel.recv()  # the parent never sends: this returns when its end closes
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(stop.set)

    threading.Thread(target=watch_parent, name=f"parent-watch-{index}", daemon=True).start()
    broken = await app.serve_until(stop)  # a broken audit chain: exit 1, and all restart
    await app.stop()
    return 1 if broken else 0
