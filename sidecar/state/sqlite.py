"""The SQLite store: the embedded default, safe for several processes on one host.

WAL journal, one connection per store. Each Check's read-decide-write runs in a
``BEGIN IMMEDIATE`` transaction, which takes SQLite's write lock up front, so two processes
(or two Checks) can never both read the same budget and both spend it. The transaction is
synchronous and does no other I/O, so the lock is held for microseconds.

Durability: ``synchronous=NORMAL`` in WAL mode survives a process crash (the OS has the
pages); a power loss can lose the last transactions, which only under-counts budgets and
forgets idempotency keys from the last moments. The audit log (fsynced) is the record.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal
from importlib import resources
from pathlib import Path

from sidecar.engine import (
    Decision,
    RateBucket,
    Revocation,
    RunUsage,
    StateChanges,
    StateView,
    StoredDecision,
)
from sidecar.errors import StoreUnavailableError
from sidecar.policy.model import KillScope, KillSwitch
from sidecar.state.codec import decode_decision, encode_decision
from sidecar.state.store import DecisionScope, IssuedToken

RUN_USAGE_RETENTION_SECONDS = 7 * 24 * 3600
"""Run counters untouched this long are dropped: no agent run lasts a week."""

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


class _Transaction:
    """The reads and writes of one Check on an open ``BEGIN IMMEDIATE`` transaction."""

    def __init__(self, connection: sqlite3.Connection) -> None:
        self._db = connection
        self._committed = False

    def view(self, scope: DecisionScope | None, now: float) -> StateView:
        try:
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
                "SELECT tool, args_digest, decision, decision_id FROM idempotency_keys "
                "WHERE agent = ? AND key = ? AND expires_at > ?",
                (scope.agent, scope.idempotency_key, now),
            ).fetchone()
            if row is not None:
                stored = StoredDecision(row[0], row[1], decode_decision(row[2]), row[3])
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
        return StateView(
            kill_switches=switches,
            idempotent=stored,
            usage=usage,
            rate=RateBucket(bucket[0], bucket[1]) if bucket else None,
            revocation=revocation,
        )

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
    ) -> None:
        if self._committed:
            raise RuntimeError("a decision transaction commits once")
        self._committed = True
        db = self._db
        if changes.count_call:
            db.execute(
                "INSERT INTO run_usage (run_key, calls, cost_micros, updated_at) "
                "VALUES (?, 1, ?, ?) ON CONFLICT (run_key) DO UPDATE SET calls = calls + 1, "
                "cost_micros = cost_micros + excluded.cost_micros, "
                "updated_at = excluded.updated_at",
                (scope.run_key, int(cost.scaleb(_COST_DIGITS)), now),
            )
        if changes.count_call or changes.failure_streak is not None:
            db.execute(
                "INSERT INTO run_tool_usage (run_key, tool, calls, failure_streak, updated_at) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (run_key, tool) DO UPDATE SET "
                "calls = calls + excluded.calls, "
                "failure_streak = COALESCE(?, failure_streak), updated_at = excluded.updated_at",
                (
                    scope.run_key,
                    scope.tool,
                    1 if changes.count_call else 0,
                    changes.failure_streak or 0,
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
        if changes.remember and scope.idempotency_key:
            db.execute(
                "INSERT INTO idempotency_keys (agent, key, tool, args_digest, decision, "
                "decision_id, created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (agent, key) DO UPDATE SET tool = excluded.tool, "
                "args_digest = excluded.args_digest, decision = excluded.decision, "
                "decision_id = excluded.decision_id, created_at = excluded.created_at, "
                "expires_at = excluded.expires_at",
                (
                    scope.agent,
                    scope.idempotency_key,
                    scope.tool,
                    scope.args_digest,
                    encode_decision(decision),
                    decision_id,
                    now,
                    now + idempotency_window_seconds,
                ),
            )


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


class SQLiteStore:
    """The Store on one SQLite file (``STATE_DIR/state.db``)."""

    def __init__(self, path: Path, *, busy_timeout_seconds: float = 5.0) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(
                path, timeout=busy_timeout_seconds, isolation_level=None, check_same_thread=False
            )
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA synchronous = NORMAL")
            self._db.execute("PRAGMA foreign_keys = ON")
            self._migrate()
        except sqlite3.Error as exc:
            raise StoreUnavailableError(f"cannot open the state store {path}: {exc}") from exc
        path.chmod(0o600)

    def _migrate(self) -> None:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations "
                "(version INTEGER PRIMARY KEY, applied_at REAL NOT NULL DEFAULT (unixepoch()))"
            )
            applied = {row[0] for row in db.execute("SELECT version FROM schema_migrations")}
            for version, script in _migrations():
                if version in applied:
                    continue
                for statement in filter(str.strip, script.split(";")):
                    db.execute(statement)
                db.execute("INSERT INTO schema_migrations (version) VALUES (?)", (version,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    @contextmanager
    def decision(self) -> Iterator[_Transaction]:
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise StoreUnavailableError(f"state store unavailable: {exc}") from exc
        try:
            yield _Transaction(self._db)
        except BaseException:
            self._db.execute("ROLLBACK")
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

    def set_kill_switch(self, switch: KillSwitch) -> KillSwitch:
        with self._write():
            self._db.execute(
                "INSERT INTO kill_switches (scope, target, reason, engaged_by, engaged_at) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (scope, target) DO UPDATE SET "
                "reason = excluded.reason, engaged_by = excluded.engaged_by, "
                "engaged_at = excluded.engaged_at",
                (switch.scope.value, switch.target, switch.reason, switch.engaged_by,
                 switch.engaged_at),
            )  # fmt: skip
        return KillSwitch(
            switch.scope,
            switch.target,
            switch.reason,
            source="api",
            engaged_by=switch.engaged_by,
            engaged_at=switch.engaged_at,
        )

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
                removed += self._db.execute(
                    f"DELETE FROM {table} WHERE updated_at < ?",  # noqa: S608 - fixed names
                    (stale,),
                ).rowcount
        return removed

    @contextmanager
    def _write(self) -> Iterator[None]:
        try:
            with self.decision():
                yield
        except sqlite3.Error as exc:
            raise StoreUnavailableError(f"state store unavailable: {exc}") from exc

    def close(self) -> None:
        self._db.close()
