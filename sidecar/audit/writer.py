"""A durable, append-only, hash-chained audit log with group commit.

Callers hand a record body to ``append`` and await it. The body is encoded on the caller's
thread (the costly part, and independent of where the record lands: ``chain.prepare``). One
writer thread takes every record queued so far, gives each its place in the chain (``seq``,
``prev``, ``hash``: assigned here, in write order, so concurrent Checks can never interleave the
chain), writes them, and calls ``fsync`` once for the whole batch, so concurrent Checks share
the cost of durability. The writer does little Python work of its own (it holds the GIL only
briefly, so it does not slow the event loop down) and wakes each event loop once per batch.
When Checks arrive together, a record waits up to ``group_commit_seconds`` (counted from its
arrival) for as many others as the recent batches held, so a batch is several records rather
than one: fewer fsyncs and fewer thread hand-offs per Check. While calls come one at a time
(and from ~0.2 s after a busy spell) a record is handed over at once; ``group_commit_seconds``
of 0 never waits.
``append`` returns only once the record is on disk, and raises ``AuditWriteError`` if it could
not be: the caller must then not answer ALLOW.

Every ``checkpoint_every`` records or ``checkpoint_seconds`` (whichever comes first), on
rotation and on close, the writer adds a checkpoint signed with the sidecar's key. The active
file is rotated once it reaches ``max_file_bytes``; the chain continues in the next file.

On start an existing log is resumed: the writer reads back to the last checkpoint, checks its
signature and every record after it, and continues the chain from the last record. An
incomplete last line (a crash mid-write: never acknowledged) is cut off. Anything else that
does not verify stops the start (``AuditLogCorruptError``) rather than extend a broken chain.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import fcntl
import logging
import os
import queue
import stat
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sidecar.audit.chain import (
    ChainState,
    ChainVerifier,
    Prepared,
    Problem,
    parse_line,
    prepare,
    seal_checkpoint,
)
from sidecar.audit.files import segment_path, segments
from sidecar.clock import Clock, SystemClock, timestamp
from sidecar.errors import AuditWriteError, SidecarError
from sidecar.peaks import RecentPeak
from tokens import SigningKey, VerificationKeys

log = logging.getLogger("proviso.audit")

DEFAULT_CHECKPOINT_EVERY = 1000
DEFAULT_CHECKPOINT_SECONDS = 5.0
DEFAULT_MAX_FILE_BYTES = 64 * 1024 * 1024
DEFAULT_GROUP_COMMIT_SECONDS = 0.004
"""How long a record may wait for the others a busy loop is about to append."""
_PEAK_WINDOW_SECONDS = 0.1
"""Batch sizes are remembered this long: the largest recent one is what the next waits for."""
_READ_CHUNK = 64 * 1024


@dataclass(frozen=True, slots=True)
class Receipt:
    """Where a record landed in the chain."""

    seq: int
    hash: str


Waiter = concurrent.futures.Future[Receipt] | asyncio.Future[Receipt]


@dataclass(frozen=True, slots=True)
class _Pending:
    """A record waiting for its place in the chain, and who waits for it to be durable.

    ``loop`` is set when ``waiter`` is an asyncio future: it is settled on that loop.
    """

    record: Prepared
    waiter: Waiter
    loop: asyncio.AbstractEventLoop | None = None


_STOP = object()
CommitObserver = Callable[[int, bool], None]
"""Called by the writer thread after each durable write: (records in it, checkpoint added)."""


class AuditLogCorruptError(SidecarError):
    """The existing log does not verify where the writer would continue it."""

    def __init__(self, path: Path, detail: str) -> None:
        super().__init__(
            f"audit log {path} cannot be continued: {detail}. Run `proviso audit verify` on it; "
            "to start a new chain, move the log's files aside"
        )


class AuditLogInUseError(SidecarError):
    """Another process is writing the log: two writers would fork its hash chain."""

    def __init__(self, path: Path) -> None:
        super().__init__(
            f"audit log {path} is being written by another process (is another proviso serving "
            "this state directory?). One process writes each log: run a single server per state "
            "directory, with `serve --workers N` for more processes"
        )


class AuditLog:
    """One hash-chained log, appended to by a single writer thread.

    A regular file's log is held with an exclusive ``flock`` on ``PATH.lock`` while open, so a
    second server started on the same state directory fails at start instead of interleaving
    its records with this one's.
    """

    def __init__(
        self,
        path: Path,
        *,
        signer: SigningKey,
        keys: VerificationKeys | None = None,
        clock: Clock | None = None,
        max_batch: int = 512,
        group_commit_seconds: float = DEFAULT_GROUP_COMMIT_SECONDS,
        peak_window_seconds: float = _PEAK_WINDOW_SECONDS,
        checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
        checkpoint_seconds: float = DEFAULT_CHECKPOINT_SECONDS,
        max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
        on_commit: CommitObserver | None = None,
        sibling_logs: Sequence[str] = (),
    ) -> None:
        """Open (or create) the log and resume its chain.

        Raises:
            AuditLogCorruptError: the existing log does not verify at its end.
            AuditLogInUseError: another process has the log open.
            OSError: the file cannot be opened.
        """
        self.path = path
        self._signer = signer
        self._keys = keys or VerificationKeys.from_signing_keys([signer])
        self._clock = clock or SystemClock()
        self._max_batch = max_batch
        self._group_commit_seconds = group_commit_seconds
        self._checkpoint_every = checkpoint_every
        self._checkpoint_seconds = checkpoint_seconds
        self._max_file_bytes = max_file_bytes
        self._on_commit = on_commit
        self._sibling_logs = tuple(sibling_logs)
        self._queue: queue.SimpleQueue[_Pending | list[_Pending] | object] = queue.SimpleQueue()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_fd = _lock_log(path)
        try:
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        except BaseException:
            _unlock_log(self._lock_fd)
            raise
        try:
            self._regular = stat.S_ISREG(os.fstat(self._fd).st_mode)
            state, self._file_first_seq = self._resume() if self._regular else (ChainState(), 0)
        except BaseException:
            os.close(self._fd)
            _unlock_log(self._lock_fd)
            raise
        self._seq, self._head, self._sealed_seq = state.seq, state.head, state.sealed_seq
        self._last_checkpoint = time.monotonic()
        self._size = os.fstat(self._fd).st_size if self._regular else 0
        self._broken = ""
        self._inflight: list[_Pending] = []
        # Records appended on an event loop, not yet handed to the writer (see ``append``).
        self._batch: list[_Pending] = []
        self._batch_loop: asyncio.AbstractEventLoop | None = None
        self._batch_in_flight = False
        self._gathering: asyncio.TimerHandle | None = None
        self._send_at_once = False  # send_gathered came while a batch was being written
        self._first_waiting = 0.0  # when the oldest record of ``_batch`` was appended
        self._batch_peak = RecentPeak(peak_window_seconds)  # of the batches handed over
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
        self._thread.start()

    @property
    def broken(self) -> str:
        """Why the log refuses every record until a restart ("" while it writes): a failed
        fsync, a file deleted or moved away while open, a rotation that could not open its next
        file."""
        return self._broken

    @property
    def head(self) -> Receipt:
        """The last record written (seq 0 and the genesis hash for an empty log)."""
        return Receipt(self._seq, self._head)

    async def append(self, body: Mapping[str, Any]) -> Receipt:
        """Append one record and wait until it is durable.

        ``body`` is a JSON object without ``seq``, ``prev`` and ``hash``; numbers may be
        ``int`` or ``Decimal``.

        Records appended on an event loop are handed to the writer in batches: all those
        appended while the previous batch was being written go together (group commit), so the
        writer thread wakes, and wakes the loop, once per batch rather than once per record.
        While recent batches held several records, a new one waits (at most the group commit
        window) until as many have gathered.

        Raises:
            AuditWriteError: the record could not be written and synced.
        """
        return await self.enqueue(body)

    def enqueue(
        self, body: Mapping[str, Any], *, gathered: bool = False
    ) -> asyncio.Future[Receipt]:
        """``append`` without the wait: the record is queued now (on the running loop), and the
        future says when it is durable, or raises ``AuditWriteError``.

        ``gathered``: the caller queues several records together (a decision batch's) and then
        calls ``send_gathered``, so this one waits for it instead of going to an fsync of its
        own as the first record after a quiet spell would. Should ``send_gathered`` not come,
        the record goes when the group commit window closes, or after the write under way.
        """
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Receipt] = loop.create_future()
        record = self._prepare(body, waiter)
        if record is not None:
            if self._batch_loop is not loop:
                # Another loop's records (tests): hand them over now. That loop may be gone
                # and never hear its batch is done, so this loop does not wait for it.
                self._flush_batch()
                self._batch_in_flight = False
                self._batch_loop = loop
            if not self._batch:
                self._first_waiting = time.monotonic()
            self._batch.append(_Pending(record, waiter, loop))
            self._hand_over(loop, gathered=gathered)
        return waiter

    def submit(self, body: Mapping[str, Any]) -> concurrent.futures.Future[Receipt]:
        """Queue one record; the future resolves once it is durable (or fails)."""
        future: concurrent.futures.Future[Receipt] = concurrent.futures.Future()
        self._enqueue(body, future, None)
        return future

    def _enqueue(
        self, body: Mapping[str, Any], waiter: Waiter, loop: asyncio.AbstractEventLoop | None
    ) -> None:
        record = self._prepare(body, waiter)
        if record is not None:
            self._queue.put(_Pending(record, waiter, loop))

    def _prepare(self, body: Mapping[str, Any], waiter: Waiter) -> Prepared | None:
        """The record encoded for the writer, or None once ``waiter`` holds the failure."""
        if self._closed or self._broken:
            waiter.set_exception(AuditWriteError(self._broken or "the audit log is closed"))
            return None
        try:
            return prepare(body)
        except (ValueError, RecursionError) as exc:
            waiter.set_exception(AuditWriteError(f"not a valid audit record: {exc}"))
            return None

    def _hand_over(self, loop: asyncio.AbstractEventLoop, *, gathered: bool = False) -> None:
        """Give the writer the loop's records, now or once the others expected have come.

        Under load the event loop is the bottleneck and an fsync is short next to a Check, so
        without waiting almost every record would be a batch of its own. One call in flight
        makes batches of one: then nothing waits. ``gathered`` records (see ``enqueue``) do
        not count towards the recent peak: ``send_gathered`` says when they are all here.
        """
        if self._batch_in_flight or not self._batch:
            return  # the batch being written hands these over when it is done
        now = time.monotonic()
        waited = now - self._first_waiting
        if (
            self._send_at_once
            or waited >= self._group_commit_seconds
            or (not gathered and len(self._batch) >= self._batch_peak.current(now))
        ):
            self._flush_batch()
        elif self._gathering is None:
            self._gathering = loop.call_later(self._group_commit_seconds - waited, self._gathered)

    def send_gathered(self) -> None:
        """Hand the records gathered on this loop to the writer now, without waiting for
        company: their Checks were decided together, so no others are coming with them. (If a
        batch is being written, they go when it is done.)"""
        if self._batch_in_flight:
            self._send_at_once = bool(self._batch)
        else:
            self._flush_batch()

    def _gathered(self) -> None:
        self._gathering = None
        if not self._batch_in_flight:
            self._flush_batch()

    def _flush_batch(self) -> None:
        if self._gathering is not None:
            self._gathering.cancel()
            self._gathering = None
        self._send_at_once = False
        if self._batch:
            batch, self._batch = self._batch, []
            self._batch_in_flight = True
            self._queue.put(batch)
            self._batch_peak.observe(len(batch), time.monotonic())

    def _settle(self, outcomes: Sequence[tuple[_Pending, Outcome]]) -> None:
        """Resolve waiters: futures here; a loop's batch with one wake-up of that loop.

        A waiter already done is one whose caller gave up (a deadline cancelled it): skipped.
        """
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Waiter, Outcome]]] = {}
        for pending, outcome in outcomes:
            if pending.loop is None:
                _resolve(pending.waiter, outcome)
            else:
                by_loop.setdefault(pending.loop, []).append((pending.waiter, outcome))
        for loop, waiters in by_loop.items():
            with contextlib.suppress(RuntimeError):  # the loop is closed: no one is waiting
                loop.call_soon_threadsafe(self._batch_done, waiters)

    def _batch_done(self, waiters: list[tuple[Waiter, Outcome]]) -> None:
        """On the loop, when the writer is done with a batch: settle it, send the next."""
        _resolve_all(waiters)
        loop = asyncio.get_running_loop()
        if loop is not self._batch_loop:
            return  # records now come from another loop (tests), which sends its own
        self._batch_in_flight = False
        self._hand_over(loop)

    def close(self) -> None:
        """Write what is queued, seal it with a last checkpoint, stop, and close the file."""
        if self._closed:
            return
        self._closed = True
        self._flush_batch()
        self._queue.put(_STOP)
        self._thread.join()
        os.close(self._fd)
        _unlock_log(self._lock_fd)

    # ------------------------------------------------------------ the writer thread

    def _run(self) -> None:
        """The writer loop; an unexpected error fails every record from then on, never hangs."""
        while True:
            try:
                self._loop()
            except Exception as exc:
                log.exception("the audit writer failed; every Check now fails closed")
                self._broken = f"the audit writer failed ({type(exc).__name__})"
                error = AuditWriteError(self._broken)
                self._settle([(pending, error) for pending in self._inflight])
                continue
            return

    def _loop(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=self._checkpoint_due_in())
            except queue.Empty:
                self._commit([])  # only a checkpoint is due
                continue
            if item is _STOP:
                break
            batch: list[_Pending] = []
            _add(batch, item)
            stop = False
            while len(batch) < self._max_batch:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is _STOP:
                    stop = True
                    break
                _add(batch, more)
            self._inflight = batch
            self._commit(batch)
            self._maybe_rotate()
            if stop:
                break
        if not self._broken:
            self._commit([], force_checkpoint=True)

    def _checkpoint_due_in(self) -> float | None:
        """Seconds until a time-based checkpoint is due; None when nothing awaits sealing."""
        if self._seq == self._sealed_seq or self._broken:
            return None
        return max(0.0, self._last_checkpoint + self._checkpoint_seconds - time.monotonic())

    def _commit(self, batch: list[_Pending], *, force_checkpoint: bool = False) -> bool:
        """Seal, write and fsync ``batch`` (plus a checkpoint if one is due); settle its waiters."""
        if self._broken:
            self._settle([(pending, AuditWriteError(self._broken)) for pending in batch])
            return False
        seq, head = self._seq, self._head
        lines: list[bytes] = []
        done: list[tuple[_Pending, Receipt]] = []
        for pending in batch:
            sealed = pending.record.seal(seq=seq + 1, prev=head)
            seq, head = sealed.seq, sealed.hash
            lines.append(sealed.line)
            done.append((pending, Receipt(seq, head)))
        unsealed = seq - self._sealed_seq
        checkpoint = unsealed > 0 and (
            force_checkpoint
            or unsealed >= self._checkpoint_every
            or time.monotonic() - self._last_checkpoint >= self._checkpoint_seconds
        )
        if checkpoint:
            sealed = seal_checkpoint(
                seq=seq + 1,
                prev=head,
                first_seq=self._sealed_seq + 1,
                time=timestamp(self._clock.now()),
                key=self._signer,
                logs=self._sibling_logs,
            )
            seq, head = sealed.seq, sealed.hash
            lines.append(sealed.line)
        if not lines:
            return True
        try:
            self._write(b"".join(lines))
        except OSError as exc:
            error = AuditWriteError(f"audit write failed: {exc.strerror or exc}")
            self._settle([(pending, error) for pending, _ in done])
            return False
        if self._regular and not self._file_first_seq:
            self._file_first_seq = self._seq + 1
        self._seq, self._head = seq, head
        if checkpoint:
            self._sealed_seq = seq
            self._last_checkpoint = time.monotonic()
        self._settle(done)
        if self._on_commit is not None:
            try:
                self._on_commit(len(done), checkpoint)
            except Exception:
                log.exception("an audit commit observer failed")
        return True

    def _write(self, data: bytes) -> None:
        """Append and fsync, or leave the file as it was (and the chain state untouched).

        A failed write is cut off so the log never holds half a batch. After a failed fsync
        (or a failed cut) the state of the file is unknown, so the log refuses every later
        write rather than build on it: a restart resumes from what is really on disk.
        """
        start = os.lseek(self._fd, 0, os.SEEK_END) if self._regular else 0
        try:
            view = memoryview(data)
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
        except OSError:
            try:
                os.ftruncate(self._fd, start)
            except OSError as cut:
                self._broken = f"the audit log could not be repaired after a failed write: {cut}"
            raise
        try:
            os.fsync(self._fd)
        except OSError as exc:
            self._broken = f"fsync of the audit log failed ({exc.strerror or exc})"
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, start)
            raise
        if self._regular and not self._still_at_path():
            # Deleted, or moved away (a log rotation of its own), while open: what was written
            # is not where the log is read, and a restart would begin a new chain at seq 1 in
            # a new file. Refused until a restart, which resumes from the files that are there.
            self._broken = (
                f"the audit log {self.path} was deleted or moved while open; restart the server"
            )
            raise OSError(errno.ENOENT, self._broken)
        self._size = start + len(data)

    def _still_at_path(self) -> bool:
        """Whether the open file is still the one at ``path`` (a failed look counts as no)."""
        try:
            opened, named = os.fstat(self._fd), os.stat(self.path)
        except OSError:
            return False
        return opened.st_nlink > 0 and (opened.st_dev, opened.st_ino) == (
            named.st_dev,
            named.st_ino,
        )

    def _maybe_rotate(self) -> None:
        """Seal the active file and start a new one once it reaches its size limit."""
        if not self._regular or self._size < self._max_file_bytes or self._broken:
            return
        if not self._commit([], force_checkpoint=True):
            return
        target = segment_path(self.path, self._file_first_seq)
        try:
            os.rename(self.path, target)
            _fsync_directory(self.path.parent)
        except OSError as exc:
            log.warning("audit log rotation failed", extra={"error": str(exc)})
            return
        try:
            fresh = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            _fsync_directory(self.path.parent)
        except OSError as exc:
            self._broken = f"cannot open a new audit log file after rotation ({exc})"
            return
        os.close(self._fd)
        self._fd = fresh
        self._size, self._file_first_seq = 0, 0
        log.info("audit log rotated", extra={"segment": str(target), "next_seq": self._seq + 1})

    # ------------------------------------------------------------ resuming

    def _resume(self) -> tuple[ChainState, int]:
        """The chain state at the end of the existing log, checked back to its last checkpoint.

        Also returns the first ``seq`` of the active file (0 when it is empty).
        """
        files = [*segments(self.path), self.path]
        tail: list[tuple[Path, int, bytes, bool]] = []  # newest first
        anchor: tuple[dict[str, Any], bytes] | None = None
        limit = 4 * (self._checkpoint_every + self._max_batch)
        for path in reversed(files):
            for offset, raw, complete in _lines_backward(path):
                if complete and b'"checkpoint"' in raw:
                    record = _parse(raw)
                    if record is not None and record.get("kind") == "checkpoint":
                        anchor = record, raw
                        break
                tail.append((path, offset, raw, complete))
                if len(tail) > limit:
                    detail = f"no checkpoint in its last {limit} lines"
                    raise AuditLogCorruptError(self.path, detail)
            if anchor is not None:
                break
        tail.reverse()
        if tail and not tail[-1][3]:
            path, offset, raw, _ = tail.pop()
            if path != self.path:
                raise AuditLogCorruptError(path, "a rotated file ends with an incomplete line")
            log.warning(
                "cut an incomplete last line off the audit log (a write interrupted by a crash; "
                "it was never acknowledged)",
                extra={"path": str(path), "offset": offset, "bytes": len(raw)},
            )
            os.ftruncate(self._fd, offset)
        state = self._anchor_state(anchor)
        verifier = ChainVerifier(self._keys, state)
        for path, offset, raw, _ in tail:
            broken = verifier.feed(raw, file=str(path), line=0)
            if broken is not None:
                detail = f"{path} at byte {offset}: {broken.problem}: {broken.message}"
                raise AuditLogCorruptError(self.path, detail)
        first_seq = _first_seq(self.path)
        return verifier.state, first_seq

    def _anchor_state(self, anchor: tuple[dict[str, Any], bytes] | None) -> ChainState:
        """The state just after the last checkpoint, its own hash, range and signature checked.

        What lies before it is not read: that is ``proviso audit verify``'s job.
        """
        if anchor is None:
            return ChainState()
        record, raw = anchor
        seq, first, prev = record.get("seq"), record.get("first_seq"), record.get("prev")
        if not (isinstance(seq, int) and isinstance(first, int) and isinstance(prev, str)):
            raise AuditLogCorruptError(self.path, "its last checkpoint is malformed")
        before = ChainState(seq=seq - 1, head=prev, sealed_seq=first - 1)
        verifier = ChainVerifier(self._keys, before)
        broken = verifier.feed(raw, file=str(self.path), line=0)
        if broken is not None and broken.problem is Problem.UNKNOWN_KEY:
            log.warning(
                "the last audit checkpoint is signed by a key that is no longer in the key ring",
                extra={"kid": record.get("kid")},
            )
        elif broken is not None:
            raise AuditLogCorruptError(self.path, f"its last checkpoint: {broken.message}")
        return ChainState(seq=seq, head=str(record["hash"]), sealed_seq=seq)


Outcome = Receipt | AuditWriteError


def _add(batch: list[_Pending], item: object) -> None:
    """Add a queued item (one record, or an event loop's batch) to ``batch``."""
    if isinstance(item, list):
        batch.extend(item)
    else:
        batch.append(item)  # type: ignore[arg-type]


def _resolve_all(waiters: list[tuple[Waiter, Outcome]]) -> None:
    for waiter, outcome in waiters:
        _resolve(waiter, outcome)


def _lock_log(path: Path) -> int | None:
    """Hold ``PATH.lock`` exclusively (None for a log that is not a regular file: a pipe).

    Raises:
        AuditLogInUseError: another process holds it.
        OSError: the lock file cannot be opened or locked.
    """
    if path.exists() and not path.is_file():
        return None
    lock_fd = os.open(
        path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
    )
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(lock_fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise AuditLogInUseError(path) from None
        raise
    return lock_fd


def refuse_if_in_use(path: Path) -> None:
    """Fail now if another process writes the log at ``path`` (without keeping it locked):
    for a start that must find out before it changes shared state, such as migrating the
    store, which an older server still running on it could then no longer restart on.

    Raises:
        AuditLogInUseError: another process holds it.
        OSError: the lock file cannot be opened or locked.
    """
    _unlock_log(_lock_log(path))


def _unlock_log(lock_fd: int | None) -> None:
    if lock_fd is not None:
        os.close(lock_fd)  # releases the flock


def _resolve(waiter: Waiter, outcome: Outcome) -> None:
    if waiter.done():
        return
    with contextlib.suppress(concurrent.futures.InvalidStateError, asyncio.InvalidStateError):
        if isinstance(outcome, Receipt):
            waiter.set_result(outcome)
        else:
            waiter.set_exception(outcome)


def _parse(raw: bytes) -> dict[str, Any] | None:
    try:
        return parse_line(raw)
    except (ValueError, RecursionError):
        return None


def _first_seq(path: Path) -> int:
    """The ``seq`` of the first record of a file, or 0 if it has none."""
    with contextlib.suppress(OSError), path.open("rb") as stream:
        record = _parse(stream.readline().rstrip(b"\n"))
        if record is not None and isinstance(record.get("seq"), int):
            return int(record["seq"])
    return 0


def _lines_backward(path: Path) -> Iterator[tuple[int, bytes, bool]]:
    """``(offset, bytes without newline, complete)`` for each line, last line first."""
    try:
        stream = path.open("rb")
    except FileNotFoundError:
        return
    with stream:
        position = stream.seek(0, os.SEEK_END)
        carry = b""
        first = True
        while position > 0:
            size = min(_READ_CHUNK, position)
            position -= size
            stream.seek(position)
            parts = (stream.read(size) + carry).split(b"\n")
            carry = parts[0]
            end = position + len(parts[0]) + 1
            found = []
            for part in parts[1:]:
                found.append((end, part))
                end += len(part) + 1
            for index, (offset, part) in enumerate(reversed(found)):
                if first and index == 0:
                    first = False
                    if part:  # the file does not end with a newline: a torn last line
                        yield offset, part, False
                    continue
                yield offset, part, True
        if carry:
            yield 0, carry, not first


def _fsync_directory(directory: Path) -> None:
    """Make a rename durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
