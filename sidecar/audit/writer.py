"""A durable, append-only audit log with group commit.

Callers hand a line to ``append`` and await it; one writer thread takes every line queued so
far, writes them, and calls ``fsync`` once for the whole batch, so concurrent Checks share the
cost of durability. ``append`` returns only once the line is on disk, and raises
``AuditWriteError`` if it could not be: the caller must then not answer ALLOW.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import queue
import threading
from pathlib import Path

from sidecar.errors import AuditWriteError

_Pending = tuple[bytes, concurrent.futures.Future[None]]
_STOP = object()


class AuditLog:
    """One audit file, appended to by a single writer thread."""

    def __init__(self, path: Path, *, max_batch: int = 512) -> None:
        self.path = path
        self._max_batch = max_batch
        self._queue: queue.SimpleQueue[_Pending | object] = queue.SimpleQueue()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
        self._thread.start()

    async def append(self, line: bytes) -> None:
        """Append one line and wait until it is durable.

        Raises:
            AuditWriteError: the line could not be written and synced.
        """
        await asyncio.wrap_future(self.submit(line))

    def submit(self, line: bytes) -> concurrent.futures.Future[None]:
        """Queue one line; the future resolves once it is durable (or fails)."""
        future: concurrent.futures.Future[None] = concurrent.futures.Future()
        if self._closed:
            future.set_exception(AuditWriteError("the audit log is closed"))
            return future
        self._queue.put((line, future))
        return future

    def close(self) -> None:
        """Drain what is queued, then stop the writer and close the file."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(_STOP)
        self._thread.join()
        os.close(self._fd)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            batch: list[_Pending] = [item]  # type: ignore[list-item]
            stop = False
            while len(batch) < self._max_batch:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is _STOP:
                    stop = True
                    break
                batch.append(more)  # type: ignore[arg-type]
            self._commit(batch)
            if stop:
                return

    def _commit(self, batch: list[_Pending]) -> None:
        data = b"".join(line for line, _ in batch)
        start = -1
        try:
            start = os.lseek(self._fd, 0, os.SEEK_END)
            view = memoryview(data)
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
            os.fsync(self._fd)
        except OSError as exc:
            if start >= 0:
                self._discard_torn_tail(start)
            error = AuditWriteError(f"audit write failed: {exc.strerror or exc}")
            for _, future in batch:
                if not future.done():  # a caller that gave up (deadline) has cancelled it
                    future.set_exception(error)
            return
        for _, future in batch:
            if not future.done():
                future.set_result(None)

    def _discard_torn_tail(self, offset: int) -> None:
        """Cut a partly written batch off, so the log never holds half a line."""
        with contextlib.suppress(OSError):  # the records already failed; nothing more to do
            os.ftruncate(self._fd, offset)
