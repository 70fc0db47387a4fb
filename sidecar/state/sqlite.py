"""The SQLite store: the embedded default, safe for several processes on one host.

WAL journal, one connection per store. Each Check's read-decide-write runs in a
``BEGIN IMMEDIATE`` transaction, which takes SQLite's write lock up front, so two processes
(or two Checks) can never both read the same budget and both spend it. The transaction is
synchronous and does no other I/O, so the lock is held for microseconds.

Writers of one state directory (the workers of ``serve --workers N``, the CLI) first take an
exclusive ``flock`` on ``state.db.lock``. SQLite's own busy handler waits for a held write lock
by sleeping 1, 2, 5, 10… ms, far longer than a transaction lasts; with two workers that made
``BEGIN IMMEDIATE`` wait 0.5 ms on average. The file lock is polled from 25 µs up, so a
worker waits about as long as the other's transaction, and ``BEGIN IMMEDIATE`` then finds
SQLite's lock free. Readers take neither: WAL readers never wait for writers.

Durability: ``synchronous=NORMAL`` in WAL mode survives a process crash (the OS has the
pages); a power loss can lose the last transactions, which only under-counts budgets and
forgets idempotency keys from the last moments. The audit log (fsynced) is the record.

Checkpoints: by default SQLite copies the WAL back into the database inside the COMMIT that
fills it to 1,000 pages, with two fsyncs: a ~2.5 ms stall of the serving event loop every few
hundred Checks. A serving process (``background_checkpoints``) does it on a thread of its own
instead, see ``_Checkpointer``.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from decimal import Decimal
from importlib import resources
from pathlib import Path
from typing import Any

from sidecar.engine import (
    ApprovalRecord,
    ApprovalStatus,
    Decision,
    RateBucket,
    Revocation,
    RunUsage,
    StateChanges,
    StateView,
    StoredDecision,
    Verdict,
)
from sidecar.errors import StoreBusyError, StoreUnavailableError
from sidecar.policy.model import KillScope, KillSwitch
from sidecar.state.codec import decode_decision, encode_decision
from sidecar.state.store import (
    ApprovalEvent,
    DecisionScope,
    IssuedToken,
    NewApproval,
    StoredApproval,
)

RUN_USAGE_RETENTION_SECONDS = 7 * 24 * 3600
"""Run counters untouched this long are dropped: no agent run lasts a week."""

_COMMENT_RE = re.compile(r"--[^\n]*")
"""SQL comments, removed before a migration is split into statements at ';'."""

_LOCK_FIRST_WAIT_SECONDS = 25e-6
_LOCK_LONGEST_WAIT_SECONDS = 1e-3
"""Polling of the writers' file lock: from 25 µs, doubling, to at most 1 ms between tries."""

_SQLITE_WAIT_FLOOR_SECONDS = 0.01
"""Waits shorter than this do not wait in SQLite's busy handler (it sleeps 1, 2, 5… ms)."""

CHECKPOINT_INTERVAL_SECONDS = 0.05
"""How often the background checkpointer copies committed pages into the database."""
WAL_RESTART_FRAMES = 1000
"""WAL frames (4 KiB pages: ~4 MiB, SQLite's own threshold) after which the checkpointer holds
writers off briefly so the WAL starts over: under steady writes it otherwise never would, and
would grow. A RESTART right after a passive checkpoint has little left to copy."""
_BACKSTOP_AUTOCHECKPOINT_PAGES = 2 * WAL_RESTART_FRAMES
"""Should the checkpointer fall behind (a writer busy enough to starve its thread of the GIL)
or fail, commits checkpoint as SQLite does by default, at twice its threshold: the WAL stays
under ~8 MiB either way."""
_CHECKPOINT_LOCK_SECONDS = 0.1
"""How long the checkpointer tries for the writers' lock before it skips the turn."""
_RESTART_BACKOFF_TURNS = 64
"""After a RESTART that a reader's open snapshot kept from finishing, the checkpointer waits
1, 2, 4… up to this many turns before it tries again (each try holds writers off briefly)."""

log = logging.getLogger("proviso.state")

_COST_DIGITS = 6
"""Costs are stored in millionths, so sums are exact integers (tool costs have <= 6 decimals)."""

_USAGE = (
    "SELECT COALESCE(r.calls, 0), COALESCE(r.cost_micros, 0), COALESCE(t.calls, 0), "
    "COALESCE(t.failure_streak, 0) FROM (SELECT ? AS run_key, ? AS tool) AS k "
    "LEFT JOIN run_usage AS r ON r.run_key = k.run_key "
    "LEFT JOIN run_tool_usage AS t ON t.run_key = k.run_key AND t.tool = k.tool"
)


def _migrations() -> list[tuple[int, str]]:
    folder = resources.files("sidecar.state").joinpath("migrations")
    scripts = []
    for entry in folder.iterdir():
        if entry.name.endswith(".sql"):
            scripts.append((int(entry.name.split("_", 1)[0]), entry.read_text("utf-8")))
    return sorted(scripts)


@contextmanager
def _reading() -> Iterator[None]:
    """A read of the store: an SQLite error is ``StoreUnavailableError`` (fail closed)."""
    try:
        yield
    except sqlite3.Error as exc:
        raise StoreUnavailableError(f"state store unavailable: {exc}") from exc


class _Transaction:
    """The reads and writes of one Check on an open ``BEGIN IMMEDIATE`` transaction."""

    def __init__(self, connection: sqlite3.Connection) -> None:
        self._db = connection
        self._committed = False

    def view(self, scope: DecisionScope | None, now: float) -> StateView:
        try:  # as ``_reading`` does, without a generator on every Check's path
            return self._view(scope, now)
        except sqlite3.Error as exc:
            raise StoreUnavailableError(f"state store unavailable: {exc}") from exc

    def _view(self, scope: DecisionScope | None, now: float) -> StateView:
        switches = _kill_switches(self._db)
        if scope is None:
            return StateView(kill_switches=switches)
        revocation = _revocation(self._db, scope.token_ids) if scope.token_ids else None
        stored = None
        if scope.idempotency_key:
            row = self._db.execute(
                "SELECT tool, args_digest, decision, decision_id, run_id FROM idempotency_keys "
                "WHERE agent = ? AND key = ? AND expires_at > ?",
                (scope.agent, scope.idempotency_key, now),
            ).fetchone()
            if row is not None:
                stored = StoredDecision(row[0], row[1], decode_decision(row[2]), row[3], row[4])
        row = self._db.execute(_USAGE, (scope.run_key, scope.tool)).fetchone()
        usage = RunUsage(
            calls=row[0],
            cost=Decimal(row[1]).scaleb(-_COST_DIGITS),
            tool_calls=row[2],
            failure_streak=row[3],
        )
        bucket = self._db.execute(
            "SELECT tokens, updated_at FROM rate_buckets WHERE agent = ?", (scope.agent,)
        ).fetchone()
        approval = _approval(self._db, scope.approval_id) if scope.approval_id else None
        open_approval = None
        if scope.may_need_approval:
            row = self._db.execute(
                "SELECT id FROM approvals WHERE agent = ? AND tool = ? AND args_digest = ? "
                "AND run_id = ? AND status = 'pending' ORDER BY created_at DESC LIMIT 1",
                (scope.agent, scope.tool, scope.args_digest, scope.run_id),
            ).fetchone()
            open_approval = _approval(self._db, row[0]) if row else None
        return StateView(
            kill_switches=switches,
            idempotent=stored,
            usage=usage,
            rate=RateBucket(bucket[0], bucket[1]) if bucket else None,
            approval=approval.record if approval else None,
            open_approval=open_approval.record if open_approval else None,
            revocation=revocation,
        )

    def pending_approvals(self, agent: str, now: float) -> int:
        with _reading():
            row = self._db.execute(
                "SELECT COUNT(*) FROM approvals WHERE agent = ? AND status = 'pending' "
                "AND expires_at > ?",
                (agent, now),
            ).fetchone()
        return int(row[0])

    def commit(
        self,
        scope: DecisionScope,
        changes: StateChanges,
        *,
        decision: Decision,
        decision_id: str,
        cost: Decimal,
        now: float,
        idempotency_window_seconds: int,
        new_approval: NewApproval | None = None,
    ) -> None:
        if self._committed:
            raise RuntimeError("a decision transaction commits once")
        self._committed = True
        db = self._db
        if changes.count_call:
            db.execute(
                "INSERT INTO run_usage (run_key, calls, cost_micros, updated_at, created_at) "
                "VALUES (?, 1, ?, ?, ?) ON CONFLICT (run_key) DO UPDATE SET calls = calls + 1, "
                "cost_micros = cost_micros + excluded.cost_micros, "
                "updated_at = excluded.updated_at",
                (scope.run_key, int(cost.scaleb(_COST_DIGITS)), now, now),
            )
        if changes.count_call or changes.failure_streak is not None:
            db.execute(
                "INSERT INTO run_tool_usage "
                "(run_key, tool, calls, failure_streak, updated_at, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (run_key, tool) DO UPDATE SET "
                "calls = calls + excluded.calls, "
                "failure_streak = COALESCE(?, failure_streak), updated_at = excluded.updated_at",
                (
                    scope.run_key,
                    scope.tool,
                    1 if changes.count_call else 0,
                    changes.failure_streak or 0,
                    now,
                    now,
                    changes.failure_streak,
                ),
            )
        if changes.rate is not None:
            db.execute(
                "INSERT INTO rate_buckets (agent, tokens, updated_at) VALUES (?, ?, ?) "
                "ON CONFLICT (agent) DO UPDATE SET tokens = excluded.tokens, "
                "updated_at = excluded.updated_at",
                (scope.agent, changes.rate.tokens, changes.rate.updated_at),
            )
        if new_approval is not None:
            _insert_approval(db, new_approval)
            _event(db, new_approval.record.id, "created", scope.agent, now)
        if changes.consume_approval:
            updated = db.execute(
                "UPDATE approvals SET status = 'consumed', closed_at = ? "
                "WHERE id = ? AND status = 'approved'",
                (now, changes.consume_approval),
            ).rowcount
            if updated != 1:
                raise StoreUnavailableError("the approval changed during the decision")
            _event(db, changes.consume_approval, "consumed", scope.agent, now)
        if changes.expire_approval:
            _expire(db, changes.expire_approval, now)
        if changes.remember and scope.idempotency_key:
            db.execute(
                "INSERT INTO idempotency_keys (agent, key, tool, args_digest, decision, "
                "decision_id, created_at, expires_at, run_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (agent, key) DO UPDATE SET tool = excluded.tool, "
                "args_digest = excluded.args_digest, decision = excluded.decision, "
                "decision_id = excluded.decision_id, created_at = excluded.created_at, "
                "expires_at = excluded.expires_at, run_id = excluded.run_id",
                (
                    scope.agent,
                    scope.idempotency_key,
                    scope.tool,
                    scope.args_digest,
                    encode_decision(decision),
                    decision_id,
                    now,
                    now + idempotency_window_seconds,
                    scope.run_id,
                ),
            )


class _Batch:
    """Checks' transactions in savepoints of one open ``BEGIN IMMEDIATE`` transaction."""

    def __init__(self, connection: sqlite3.Connection) -> None:
        self._db = connection
        self.broken = False  # a Check's writes could not be undone: the batch must not commit

    @contextmanager
    def decision(self) -> Iterator[_Transaction]:
        if self.broken:
            raise StoreUnavailableError("state store unavailable: an earlier undo failed")
        try:
            self._db.execute("SAVEPOINT check_decision")
        except sqlite3.Error as exc:
            self.broken = True
            raise StoreUnavailableError(f"state store unavailable: {exc}") from exc
        try:
            yield _Transaction(self._db)
        except BaseException as failure:
            try:
                self._db.execute("ROLLBACK TO check_decision")
                self._db.execute("RELEASE check_decision")
            except sqlite3.Error as exc:
                self.broken = True
                raise StoreUnavailableError(f"state store unavailable: {exc}") from exc
            if isinstance(failure, sqlite3.Error):
                raise StoreUnavailableError(f"state store unavailable: {failure}") from failure
            raise
        try:
            self._db.execute("RELEASE check_decision")
        except sqlite3.Error as exc:
            self.broken = True
            raise StoreUnavailableError(f"state store unavailable: {exc}") from exc


_APPROVAL_COLUMNS = (
    "id, agent, tool, args_digest, run_id, tier, approvals_required, approver_roles, vetoes, "
    "status, created_at, expires_at, arguments, token_id, policy_version, closed_at, rules"
)


def _approval(db: sqlite3.Connection, approval_id: str) -> StoredApproval | None:
    row = db.execute(
        f"SELECT {_APPROVAL_COLUMNS} FROM approvals WHERE id = ?",  # noqa: S608 - fixed columns
        (approval_id,),
    ).fetchone()
    return _stored_approval(db, row) if row else None


def _stored_approval(db: sqlite3.Connection, row: tuple[Any, ...]) -> StoredApproval:
    verdicts = tuple(
        Verdict(approver, bool(approve), tuple(json.loads(roles)), at, comment)
        for approver, approve, roles, comment, at in db.execute(
            "SELECT approver, approve, roles, comment, at FROM approval_verdicts "
            "WHERE approval_id = ? ORDER BY at, approver",
            (row[0],),
        )
    )
    record = ApprovalRecord(
        id=row[0],
        agent=row[1],
        tool=row[2],
        args_digest=row[3],
        run_id=row[4],
        tier=row[5],
        approvals_required=row[6],
        approver_roles=tuple(json.loads(row[7])),
        vetoes=row[8],
        status=ApprovalStatus(row[9]),
        created_at=row[10],
        expires_at=row[11],
        verdicts=verdicts,
        rules=row[16],
    )
    return StoredApproval(record, row[12], row[13], row[14], row[15])


def _insert_approval(db: sqlite3.Connection, new: NewApproval) -> None:
    r = new.record
    db.execute(
        f"INSERT INTO approvals ({_APPROVAL_COLUMNS}) "  # noqa: S608 - fixed columns
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, ?)",
        (r.id, r.agent, r.tool, r.args_digest, r.run_id, r.tier, r.approvals_required,
         json.dumps(list(r.approver_roles)), r.vetoes, r.status.value, r.created_at,
         r.expires_at, new.arguments, new.token_id, new.policy_version, r.rules),
    )  # fmt: skip


def _event(db: sqlite3.Connection, approval_id: str, event: str, actor: str, now: float) -> None:
    db.execute(
        "INSERT INTO approval_events (approval_id, event, actor, at) VALUES (?, ?, ?, ?)",
        (approval_id, event, actor, now),
    )


def _expire(db: sqlite3.Connection, approval_id: str, now: float) -> bool:
    updated = db.execute(
        "UPDATE approvals SET status = 'expired', closed_at = ? "
        "WHERE id = ? AND status IN ('pending', 'approved')",
        (now, approval_id),
    ).rowcount
    if updated:
        _event(db, approval_id, "expired", "proviso", now)
    return bool(updated)


class _ApprovalTransaction:
    """One approval operation on an open ``BEGIN IMMEDIATE`` transaction."""

    def __init__(self, connection: sqlite3.Connection) -> None:
        self._db = connection

    def get(self, approval_id: str) -> StoredApproval | None:
        return _approval(self._db, approval_id)

    def add_verdict(self, approval_id: str, verdict: Verdict) -> None:
        self._db.execute(
            "INSERT INTO approval_verdicts (approval_id, approver, approve, roles, comment, at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (approval_id, verdict.approver, int(verdict.approve), json.dumps(list(verdict.roles)),
             verdict.comment, verdict.at),
        )  # fmt: skip

    def set_status(self, approval_id: str, status: ApprovalStatus, now: float) -> None:
        closed = now if status is not ApprovalStatus.PENDING else None
        self._db.execute(
            "UPDATE approvals SET status = ?, closed_at = ? WHERE id = ?",
            (status.value, closed, approval_id),
        )

    def add_event(self, approval_id: str, event: str, actor: str, now: float) -> None:
        _event(self._db, approval_id, event, actor, now)


_REVOCATION_COLUMNS = "token_id, reason, revoked_by, revoked_at, expires_at"


def _revocation(db: sqlite3.Connection, token_ids: tuple[str, ...]) -> Revocation | None:
    """The earliest revocation among ``token_ids`` (a lineage: at most 9 ids), if any."""
    marks = ", ".join("?" * len(token_ids))
    row = db.execute(
        f"SELECT {_REVOCATION_COLUMNS} FROM revocations "  # noqa: S608 - only '?' marks
        f"WHERE token_id IN ({marks}) ORDER BY revoked_at, token_id LIMIT 1",
        token_ids,
    ).fetchone()
    return Revocation(*row) if row is not None else None


def _kill_switches(db: sqlite3.Connection) -> tuple[KillSwitch, ...]:
    rows = db.execute(
        "SELECT scope, target, reason, engaged_by, engaged_at FROM kill_switches "
        "ORDER BY engaged_at, scope, target"
    ).fetchall()
    return tuple(
        KillSwitch(KillScope(s), t, r, source="api", engaged_by=b, engaged_at=a)
        for s, t, r, b, a in rows
    )


def _lock_writers(lock_fd: int, busy_timeout: float) -> None:
    """Take the writers' file lock, waiting at most ``busy_timeout`` seconds.

    Raises:
        StoreBusyError: another writer held it all that time.
        StoreUnavailableError: flock itself failed.
    """
    wait = _LOCK_FIRST_WAIT_SECONDS
    deadline = -1.0
    while True:
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise StoreUnavailableError(f"state store lock failed: {exc}") from exc
        else:
            return
        now = time.monotonic()
        if deadline < 0:
            deadline = now + busy_timeout
        if now >= deadline:
            raise StoreBusyError(
                f"state store unavailable: another writer held it for {busy_timeout:g} s"
            )
        time.sleep(min(wait, deadline - now))
        wait = min(wait * 2, _LOCK_LONGEST_WAIT_SECONDS)


class _Checkpointer:
    """Copies committed pages from the WAL into the database, on a thread of its own.

    Each turn is a PASSIVE checkpoint, which waits for nobody: the copying and the fsyncs run
    while Checks go on committing. A passive checkpoint never lets the WAL start over while
    writers keep appending, so once it holds ``restart_frames`` frames the checkpointer takes
    the writers' file lock (through its own descriptor: flock is per open file, not per
    thread) for a RESTART, which has little left to copy, and the next commit starts the WAL
    from its beginning. The RESTART does not wait for readers (busy timeout 0): one holding an
    old snapshot (a ``sqlite3`` shell, a backup) makes it return at once, and the next try is
    backed off. Failures are logged and retried at the next turn; should it keep failing,
    commits checkpoint themselves again past ``_BACKSTOP_AUTOCHECKPOINT_PAGES``, as with
    SQLite's default, only later.
    """

    def __init__(
        self,
        path: Path,
        lock_path: Path,
        *,
        interval_seconds: float,
        restart_frames: int,
    ) -> None:
        self._interval = interval_seconds
        self._restart_frames = restart_frames
        self._lock_fd = os.open(lock_path, os.O_RDWR | os.O_CLOEXEC)
        try:
            # Made here, used only on the thread (and closed after it has been joined).
            self._db = sqlite3.connect(
                path, timeout=0, isolation_level=None, check_same_thread=False
            )
        except BaseException:
            os.close(self._lock_fd)
            raise
        self._failing = False
        self._backoff = 0  # turns to wait before the next RESTART; 0 when the last one finished
        self._skip = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="state-checkpoint", daemon=True)
        self._thread.start()

    def checkpoint(self) -> int:
        """One turn; returns how many frames the WAL held before it.

        Raises:
            sqlite3.Error: the checkpoint failed.
            StoreUnavailableError: flock failed on the writers' lock (not: it was busy).
        """
        frames: int = self._db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[1]
        if frames < self._restart_frames:
            return frames
        if self._skip:
            self._skip -= 1
            return frames
        try:
            _lock_writers(self._lock_fd, _CHECKPOINT_LOCK_SECONDS)
        except StoreBusyError:
            return frames  # next turn
        try:
            busy = self._db.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()[0]
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
        if busy:
            if not self._backoff:
                log.info("a reader's snapshot keeps the state WAL from starting over; retrying")
            self._backoff = min(max(1, 2 * self._backoff), _RESTART_BACKOFF_TURNS)
            self._skip = self._backoff
        else:
            self._backoff = 0
        return frames

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.checkpoint()
            except (sqlite3.Error, StoreUnavailableError) as exc:
                if not self._failing:
                    log.warning("state checkpoint failed; retrying", extra={"error": str(exc)})
                self._failing = True
            else:
                if self._failing:
                    log.info("state checkpoints work again")
                self._failing = False

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._db.close()
        os.close(self._lock_fd)


class SQLiteStore:
    """The Store on one SQLite file (``STATE_DIR/state.db``)."""

    def __init__(
        self,
        path: Path,
        *,
        busy_timeout_seconds: float = 5.0,
        background_checkpoints: bool = False,
        checkpoint_interval_seconds: float = CHECKPOINT_INTERVAL_SECONDS,
        wal_restart_frames: int = WAL_RESTART_FRAMES,
    ) -> None:
        """Open (creating and migrating) the store at ``path``.

        ``background_checkpoints`` is for serving processes: commits no longer checkpoint the
        WAL themselves, a thread does (``_Checkpointer``). Short-lived users (the CLI) leave it.
        """
        path.parent.mkdir(parents=True, exist_ok=True)
        self._busy_timeout = busy_timeout_seconds
        self._patience = busy_timeout_seconds  # how long a write waits for the lock now
        self._sqlite_busy_ms = int(busy_timeout_seconds * 1000)  # the connection's timeout
        lock_path = path.with_name(path.name + ".lock")
        try:
            self._lock_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StoreUnavailableError(
                f"cannot open the state store lock {lock_path}: {exc}"
            ) from exc
        db = None
        self._checkpointer: _Checkpointer | None = None
        try:
            db = self._db = sqlite3.connect(
                path, timeout=busy_timeout_seconds, isolation_level=None, check_same_thread=False
            )
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = NORMAL")
            db.execute("PRAGMA foreign_keys = ON")
            self._migrate()
            path.chmod(0o600)
            if background_checkpoints:
                db.execute(f"PRAGMA wal_autocheckpoint = {_BACKSTOP_AUTOCHECKPOINT_PAGES}")
                self._checkpointer = _Checkpointer(
                    path,
                    lock_path,
                    interval_seconds=checkpoint_interval_seconds,
                    restart_frames=wal_restart_frames,
                )
        except BaseException as exc:
            if db is not None:
                db.close()
            os.close(self._lock_fd)
            if isinstance(exc, sqlite3.Error | OSError):
                raise StoreUnavailableError(f"cannot open the state store {path}: {exc}") from exc
            raise

    @property
    def busy_timeout_seconds(self) -> float:
        return self._busy_timeout

    def _migrate(self) -> None:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations "
                "(version INTEGER PRIMARY KEY, applied_at REAL NOT NULL DEFAULT (unixepoch()))"
            )
            applied = {row[0] for row in db.execute("SELECT version FROM schema_migrations")}
            known = _migrations()
            newest = max(version for version, _ in known)
            if applied and max(applied) > newest:
                raise StoreUnavailableError(
                    f"the state store was written by a newer proviso (schema {max(applied)}; "
                    f"this one knows up to {newest}): run that version, or a new --state-dir"
                )
            for version, script in known:
                if version in applied:
                    continue
                for statement in filter(str.strip, _COMMENT_RE.sub("", script).split(";")):
                    db.execute(statement)
                db.execute("INSERT INTO schema_migrations (version) VALUES (?)", (version,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    @contextmanager
    def patience(self, max_wait: float) -> Iterator[None]:
        before, self._patience = self._patience, max_wait
        try:
            yield
        finally:
            self._patience = before

    @contextmanager
    def decision(self) -> Iterator[_Transaction]:
        _lock_writers(self._lock_fd, self._patience)
        try:
            self._wait_in_sqlite(self._patience)
            yield from self._transaction()
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _wait_in_sqlite(self, wait: float) -> None:
        """How long ``BEGIN IMMEDIATE`` waits for SQLite's own write lock, which only a writer
        that skips the file lock holds (an operator's ``sqlite3``, a CLI's start-up migration):
        not at all for a short wait (the event loop's: busy is then ``StoreBusyError``, and the
        caller tries again off the loop), else the whole wait. Changed only when it differs."""
        busy_ms = 0 if wait < _SQLITE_WAIT_FLOOR_SECONDS else int(wait * 1000)
        if busy_ms != self._sqlite_busy_ms:
            self._db.execute(f"PRAGMA busy_timeout = {busy_ms}")
            self._sqlite_busy_ms = busy_ms

    @contextmanager
    def decisions(self) -> Iterator[_Batch]:
        with self.decision():
            batch = _Batch(self._db)
            yield batch
            if batch.broken:
                raise StoreUnavailableError("state store unavailable: a Check's undo failed")

    def _transaction(self) -> Iterator[_Transaction]:
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            if getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_BUSY:
                raise StoreBusyError(f"state store unavailable: {exc}") from exc
            raise StoreUnavailableError(f"state store unavailable: {exc}") from exc
        try:
            yield _Transaction(self._db)
        except sqlite3.Error as exc:
            # Any failure inside the decision (a read, a write, a constraint) means the store
            # cannot decide: UNAVAILABLE for the caller, never INTERNAL, never a half commit.
            self._rollback_quietly()
            raise StoreUnavailableError(f"state store unavailable: {exc}") from exc
        except BaseException:
            self._rollback_quietly()
            raise
        try:
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback_quietly()
            raise StoreUnavailableError(f"state store commit failed: {exc}") from exc

    def _rollback_quietly(self) -> None:
        try:
            self._db.execute("ROLLBACK")
        except sqlite3.Error:
            return

    def undo_decision(
        self,
        scope: DecisionScope,
        decision_id: str,
        *,
        consumed_approval: str,
        opened_approval: str = "",
        now: float,
    ) -> None:
        with self._write():
            if scope.idempotency_key:
                self._db.execute(
                    "DELETE FROM idempotency_keys WHERE agent = ? AND key = ? AND decision_id = ?",
                    (scope.agent, scope.idempotency_key, decision_id),
                )
            if consumed_approval:
                restored = self._db.execute(
                    "UPDATE approvals SET status = 'approved', closed_at = NULL "
                    "WHERE id = ? AND status = 'consumed'",
                    (consumed_approval,),
                ).rowcount
                if restored:
                    _event(self._db, consumed_approval, "restored", "proviso", now)
            if opened_approval:
                withdrawn = self._db.execute(
                    "UPDATE approvals SET status = 'expired', closed_at = ? "
                    "WHERE id = ? AND status = 'pending'",
                    (now, opened_approval),
                ).rowcount
                if withdrawn:
                    _event(self._db, opened_approval, "expired", "proviso", now)

    def set_kill_switch(self, switch: KillSwitch) -> tuple[KillSwitch, bool]:
        with self._write():
            was_engaged = (
                self._db.execute(
                    "SELECT 1 FROM kill_switches WHERE scope = ? AND target = ?",
                    (switch.scope.value, switch.target),
                ).fetchone()
                is not None
            )
            self._db.execute(
                "INSERT INTO kill_switches (scope, target, reason, engaged_by, engaged_at) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (scope, target) DO UPDATE SET "
                "reason = excluded.reason, engaged_by = excluded.engaged_by, "
                "engaged_at = excluded.engaged_at",
                (switch.scope.value, switch.target, switch.reason, switch.engaged_by,
                 switch.engaged_at),
            )  # fmt: skip
        stored = KillSwitch(
            switch.scope,
            switch.target,
            switch.reason,
            source="api",
            engaged_by=switch.engaged_by,
            engaged_at=switch.engaged_at,
        )
        return stored, was_engaged

    def release_kill_switch(self, scope: KillScope, target: str) -> KillSwitch | None:
        with self._write():
            released = [
                s for s in _kill_switches(self._db) if s.scope is scope and s.target == target
            ]
            self._db.execute(
                "DELETE FROM kill_switches WHERE scope = ? AND target = ?", (scope.value, target)
            )
        return released[0] if released else None

    def kill_switches(self) -> tuple[KillSwitch, ...]:
        try:
            return _kill_switches(self._db)
        except sqlite3.Error as exc:
            raise StoreUnavailableError(f"state store unavailable: {exc}") from exc

    def revoke(self, revocation: Revocation) -> tuple[Revocation, bool]:
        with self._write():
            created = self._db.execute(
                "INSERT INTO revocations (token_id, reason, revoked_by, revoked_at, expires_at) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (token_id) DO NOTHING",
                (revocation.token_id, revocation.reason, revocation.revoked_by,
                 revocation.revoked_at, revocation.expires_at),
            ).rowcount  # fmt: skip
            stored = _revocation(self._db, (revocation.token_id,))
        if stored is None:  # pragma: no cover - inserted or present in the same transaction
            raise StoreUnavailableError("revocation vanished while being recorded")
        return stored, created == 1

    def revocation(self, token_ids: tuple[str, ...]) -> Revocation | None:
        if not token_ids:
            return None
        try:
            return _revocation(self._db, token_ids)
        except sqlite3.Error as exc:
            raise StoreUnavailableError(f"state store unavailable: {exc}") from exc

    def record_issued(self, token: IssuedToken) -> None:
        with self._write():
            self._db.execute(
                "INSERT INTO issued_tokens (token_id, agent, issued_by, parent_id, expires_at) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (token_id) DO NOTHING",
                (token.token_id, token.agent, token.issued_by, token.parent_id, token.expires_at),
            )

    def issued(self, token_id: str) -> IssuedToken | None:
        try:
            row = self._db.execute(
                "SELECT token_id, agent, issued_by, expires_at, parent_id FROM issued_tokens "
                "WHERE token_id = ?",
                (token_id,),
            ).fetchone()
        except sqlite3.Error as exc:
            raise StoreUnavailableError(f"state store unavailable: {exc}") from exc
        return IssuedToken(*row) if row is not None else None

    def prune(self, now: float) -> int:
        with self._write():
            removed = 0
            for table in ("idempotency_keys", "revocations", "issued_tokens"):
                removed += self._db.execute(
                    f"DELETE FROM {table} WHERE expires_at <= ?",  # noqa: S608 - fixed names
                    (now,),
                ).rowcount
            stale = now - RUN_USAGE_RETENTION_SECONDS
            for table in ("run_usage", "run_tool_usage"):
                # The created_at index finds the candidates (see 0005); one created "in the
                # future" (the clock has since stepped back) is a candidate too.
                removed += self._db.execute(
                    f"DELETE FROM {table} WHERE (created_at < ? OR created_at > ?) "  # noqa: S608
                    "AND updated_at < ?",
                    (stale, now, stale),
                ).rowcount
        return removed

    @contextmanager
    def approvals(self) -> Iterator[_ApprovalTransaction]:
        with self.decision():
            yield _ApprovalTransaction(self._db)

    def get_approval(self, approval_id: str) -> StoredApproval | None:
        with _reading():
            return _approval(self._db, approval_id)

    def list_approvals(
        self,
        *,
        status: ApprovalStatus | None,
        agent: str,
        tool: str,
        limit: int,
        after: str,
    ) -> list[StoredApproval]:
        clauses, values = [], []
        for column, value in (
            ("status", status.value if status else ""),
            ("agent", agent),
            ("tool", tool),
        ):
            if value:
                clauses.append(f"{column} = ?")
                values.append(value)
        if after:
            clauses.append("(created_at, id) < (SELECT created_at, id FROM approvals WHERE id = ?)")
            values.append(after)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        with _reading():
            rows = self._db.execute(
                f"SELECT {_APPROVAL_COLUMNS} FROM approvals {where} "  # noqa: S608 - fixed SQL
                "ORDER BY created_at DESC, id DESC LIMIT ?",
                (*values, limit),
            ).fetchall()
            return [_stored_approval(self._db, row) for row in rows]

    def approval_events(self, after_seq: int, limit: int) -> list[ApprovalEvent]:
        with _reading():
            rows = self._db.execute(
                "SELECT seq, approval_id, event, actor, at FROM approval_events "
                "WHERE seq > ? ORDER BY seq LIMIT ?",
                (after_seq, limit),
            ).fetchall()
        return [ApprovalEvent(*row) for row in rows]

    def last_approval_event(self) -> int:
        with _reading():
            row = self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM approval_events").fetchone()
        return int(row[0])

    def pending_by_tier(self) -> dict[str, int]:
        with _reading():
            rows = self._db.execute(
                "SELECT tier, COUNT(*) FROM approvals WHERE status = 'pending' GROUP BY tier"
            ).fetchall()
        return {tier: count for tier, count in rows}

    def expire_approvals(
        self, now: float, stale: Callable[[str, str, str, float], bool] | None = None
    ) -> list[StoredApproval]:
        with self._write():
            due = [
                approval_id
                for approval_id, tool, tier, rules, created_at, expires_at in self._db.execute(
                    "SELECT id, tool, tier, rules, created_at, expires_at FROM approvals "
                    "WHERE status IN ('pending', 'approved')"
                ).fetchall()
                if expires_at <= now or (stale is not None and stale(tool, tier, rules, created_at))
            ]
            for approval_id in due:
                _expire(self._db, approval_id, now)
            expired = [_approval(self._db, approval_id) for approval_id in due]
        return [a for a in expired if a is not None]

    @contextmanager
    def _write(self) -> Iterator[None]:
        try:
            with self.decision():
                yield
        except sqlite3.Error as exc:
            raise StoreUnavailableError(f"state store unavailable: {exc}") from exc

    def close(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.close()
        self._db.close()
        os.close(self._lock_fd)
