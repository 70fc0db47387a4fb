"""One behaviour suite for every Store backend, so backends cannot drift (SQLite today)."""

from __future__ import annotations

import errno
import fcntl
import multiprocessing
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from sidecar.engine import (
    ApprovalRecord,
    ApprovalStatus,
    Decision,
    Outcome,
    RateBucket,
    Reason,
    ReasonCode,
    Revocation,
    StateChanges,
    StateView,
    Verdict,
)
from sidecar.errors import StoreUnavailableError
from sidecar.policy.model import KillScope, KillSwitch
from sidecar.state import (
    DecisionBatch,
    DecisionScope,
    IssuedToken,
    NewApproval,
    StateTransaction,
    Store,
)
from sidecar.state.sqlite import RUN_USAGE_RETENTION_SECONDS, SQLiteStore

WINDOW = 3600
SCOPE = DecisionScope(
    agent="a@service", tool="t", run_key="run-1", idempotency_key="k", args_digest="sha256:1"
)
ALLOW = Decision(
    Outcome.ALLOW, (Reason(ReasonCode.TIER_ALLOWED, "ok"),), "v1", "auto", agent="a@service"
)

Backend = Callable[[Path], Store]
BACKENDS: dict[str, Backend] = {"sqlite": lambda directory: SQLiteStore(directory / "state.db")}


@pytest.fixture(params=sorted(BACKENDS))
def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], Store]]:
    """Opens stores on one shared location (several opens act like several processes)."""
    opened: list[Store] = []

    def make() -> Store:
        store = BACKENDS[request.param](tmp_path)
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


def commit(
    store: Store,
    changes: StateChanges,
    *,
    now: float = 1000.0,
    cost: Decimal = Decimal(1),
    scope: DecisionScope = SCOPE,
    decision_id: str = "dec_1",
) -> None:
    with store.decision() as transaction:
        decide_in(transaction, changes, now=now, cost=cost, scope=scope, decision_id=decision_id)


def decide_in(
    transaction: StateTransaction,
    changes: StateChanges,
    *,
    now: float = 1000.0,
    cost: Decimal = Decimal(1),
    scope: DecisionScope = SCOPE,
    decision_id: str = "dec_1",
) -> StateView:
    """One decision in ``transaction``, as a Check makes it: the view it read, then its
    changes committed."""
    view = transaction.view(scope, now)
    transaction.commit(
        scope,
        changes,
        decision=ALLOW,
        decision_id=decision_id,
        cost=cost,
        now=now,
        idempotency_window_seconds=WINDOW,
    )
    return view


def test_a_new_store_is_empty(open_store: Callable[[], Store]) -> None:
    """A fresh store has no switches, usage, buckets or keys."""
    with open_store().decision() as transaction:
        view = transaction.view(SCOPE, 0.0)
    assert view.kill_switches == ()
    assert view.idempotent is None
    assert (view.usage.calls, view.usage.tool_calls, view.usage.failure_streak) == (0, 0, 0)
    assert view.rate is None


def test_reopening_applies_migrations_once(open_store: Callable[[], Store]) -> None:
    """Opening the same store twice keeps its data (migrations are idempotent)."""
    commit(open_store(), StateChanges(count_call=True))
    with open_store().decision() as transaction:
        assert transaction.view(SCOPE, 0.0).usage.calls == 1


def count_call(transaction: StateTransaction) -> int:
    """One Check's part of a batch: the run's calls before it, then one more."""
    return decide_in(transaction, StateChanges(count_call=True)).usage.calls


def test_a_batch_decides_in_order_and_undoes_only_a_failed_decision(
    open_store: Callable[[], Store],
) -> None:
    """Each decision of a batch sees those before it; one that fails leaves no writes, and the
    others commit together."""
    store = open_store()
    seen = []
    with store.decisions() as batch:
        with batch.decision() as transaction:
            seen.append(count_call(transaction))
        with pytest.raises(ValueError, match="engine bug"):
            _decide_then_fail(batch)
        with batch.decision() as transaction:
            seen.append(count_call(transaction))
    assert seen == [0, 1], "the failed decision's call was undone"
    with open_store().decision() as transaction:  # another process sees the batch whole
        assert transaction.view(SCOPE, 1000.0).usage.calls == 2


class _UndoFails:
    """A connection whose ``ROLLBACK TO`` fails (as on a failing disk); the rest is real."""

    def __init__(self, connection: sqlite3.Connection) -> None:
        self._connection = connection

    def execute(self, sql: str, *parameters: Any) -> sqlite3.Cursor:
        if sql.startswith("ROLLBACK TO"):
            raise sqlite3.OperationalError("disk I/O error")
        return self._connection.execute(sql, *parameters)


def test_a_batch_whose_undo_failed_commits_nothing(tmp_path: Path) -> None:
    """If a failed decision's writes cannot be undone, the batch holds them half-made: no
    later decision runs in it and it is rolled back whole, never committed."""
    store = SQLiteStore(tmp_path / "state.db")

    def decide_then_lose_an_undo() -> None:
        with store.decisions() as batch:
            with batch.decision() as transaction:
                count_call(transaction)
            batch._db = _UndoFails(batch._db)  # type: ignore[assignment]
            with pytest.raises(StoreUnavailableError, match="disk I/O error"):
                _decide_then_fail(batch)
            with pytest.raises(StoreUnavailableError, match="an earlier undo failed"):
                _decide_then_fail(batch)

    try:
        with pytest.raises(StoreUnavailableError, match="undo failed"):
            decide_then_lose_an_undo()
        with store.decision() as transaction:
            assert transaction.view(SCOPE, 1000.0).usage.calls == 0
    finally:
        store.close()


def _decide_then_fail(batch: DecisionBatch) -> None:
    with batch.decision() as transaction:
        count_call(transaction)
        raise ValueError("engine bug")


def test_a_batch_that_raises_commits_nothing(open_store: Callable[[], Store]) -> None:
    """A failure outside the decisions (the batch itself) rolls every decision back."""
    store = open_store()

    def decide_three_then_fail() -> None:
        with store.decisions() as batch:
            for _ in range(3):
                with batch.decision() as transaction:
                    count_call(transaction)
            raise RuntimeError("batch failed")

    with pytest.raises(RuntimeError, match="batch failed"):
        decide_three_then_fail()
    with store.decision() as transaction:
        assert transaction.view(SCOPE, 1000.0).usage.calls == 0


def test_counted_calls_and_costs_add_up_exactly(open_store: Callable[[], Store]) -> None:
    """Calls count per run and per tool; decimal costs sum without float error."""
    store = open_store()
    for _ in range(3):
        commit(store, StateChanges(count_call=True), cost=Decimal("0.1"))
    other_tool = DecisionScope(agent="a@service", tool="u", run_key="run-1")
    with store.decision() as transaction:
        same = transaction.view(SCOPE, 0.0).usage
        other = transaction.view(other_tool, 0.0).usage
    assert (same.calls, same.tool_calls, same.cost) == (3, 3, Decimal("0.3"))
    assert (other.calls, other.tool_calls) == (3, 0)


def test_failure_streak_is_set_and_reset(open_store: Callable[[], Store]) -> None:
    """The retry streak follows what the engine asks, per run and tool."""
    store = open_store()
    commit(store, StateChanges(failure_streak=2))
    with store.decision() as transaction:
        assert transaction.view(SCOPE, 0.0).usage.failure_streak == 2
    commit(store, StateChanges(failure_streak=0))
    with store.decision() as transaction:
        assert transaction.view(SCOPE, 0.0).usage.failure_streak == 0


def test_rate_bucket_round_trips(open_store: Callable[[], Store]) -> None:
    """A stored bucket comes back as stored."""
    store = open_store()
    commit(store, StateChanges(rate=RateBucket(4.5, 1000.0)))
    with store.decision() as transaction:
        assert transaction.view(SCOPE, 1001.0).rate == RateBucket(4.5, 1000.0)


def test_idempotency_record_round_trips_and_expires(open_store: Callable[[], Store]) -> None:
    """A remembered decision is returned whole within the window and gone after it."""
    store = open_store()
    commit(store, StateChanges(remember=True), now=1000.0, decision_id="dec_orig")
    with store.decision() as transaction:
        stored = transaction.view(SCOPE, 1000.0 + WINDOW - 1).idempotent
        expired = transaction.view(SCOPE, 1000.0 + WINDOW + 1).idempotent
    assert stored is not None
    assert (stored.tool, stored.args_digest, stored.decision_id) == ("t", "sha256:1", "dec_orig")
    assert stored.decision == ALLOW
    assert expired is None
    assert store.prune(1000.0 + WINDOW + 1) >= 1


def test_run_counters_untouched_for_the_retention_are_pruned(
    open_store: Callable[[], Store],
) -> None:
    """A run's counters go once untouched for a week, even a run that started long before."""
    store = open_store()
    week = RUN_USAGE_RETENTION_SECONDS
    idle = DecisionScope(agent="a@service", tool="t", run_key="run-idle")
    commit(store, StateChanges(count_call=True), now=1000.0, scope=idle)
    commit(store, StateChanges(count_call=True), now=1000.0)  # run-1 starts with run-idle...
    commit(store, StateChanges(count_call=True), now=1000.0 + week)  # ...and is still busy
    assert store.prune(1000.0 + week) == 0
    assert store.prune(1001.0 + week) == 2  # run-idle's run and tool counters
    with store.decision() as transaction:
        assert transaction.view(idle, 0.0).usage.calls == 0
        assert transaction.view(SCOPE, 0.0).usage.calls == 2


def test_a_counter_created_while_the_clock_ran_ahead_is_pruned_once_untouched(
    open_store: Callable[[], Store],
) -> None:
    """A clock that stepped back does not keep counters created before the step forever."""
    store = open_store()
    future = 10_000_000.0
    commit(store, StateChanges(count_call=True), now=future)  # the clock ran ahead...
    commit(store, StateChanges(count_call=True), now=1000.0)  # ...and came back
    assert store.prune(1000.0 + RUN_USAGE_RETENTION_SECONDS) == 0
    assert store.prune(1001.0 + RUN_USAGE_RETENTION_SECONDS) == 2


def test_a_checks_commit_leaves_created_at_and_its_index_alone(tmp_path: Path) -> None:
    """The point of created_at: a Check's update rewrites no index entry, and pruning still
    finds its candidates through the index instead of reading the whole table."""
    store = SQLiteStore(tmp_path / "state.db")
    statements: list[str] = []
    try:
        commit(store, StateChanges(count_call=True), now=1000.0)
        commit(store, StateChanges(count_call=True), now=2000.0)
        store._db.set_trace_callback(statements.append)  # the SQL prune runs, values expanded
        store.prune(3000.0)
        store._db.set_trace_callback(None)
    finally:
        store.close()
    db = sqlite3.connect(tmp_path / "state.db")
    try:
        for table in ("run_usage", "run_tool_usage"):
            row = db.execute(f"SELECT created_at, updated_at FROM {table}").fetchone()  # noqa: S608
            assert row == (1000.0, 2000.0)
            indexes = {r[1] for r in db.execute(f"PRAGMA index_list({table})")}
            assert f"{table}_created" in indexes
            assert f"{table}_updated" not in indexes
            prefix = "DELETE FROM " + table + " "  # noqa: S608 - a fixed name
            (prune,) = [sql for sql in statements if sql.startswith(prefix)]
            plan = db.execute(f"EXPLAIN QUERY PLAN {prune}").fetchall()
            assert any(f"USING INDEX {table}_created" in step[3] for step in plan), plan
    finally:
        db.close()


def test_counters_from_before_the_created_at_column_are_pruned_alike(tmp_path: Path) -> None:
    """A store written by an older version (no created_at) keeps its counters on upgrade and
    prunes them by their last use."""
    database = tmp_path / "state.db"
    SQLiteStore(database).close()
    with sqlite3.connect(database) as db:  # back to schema 4: what an older version wrote
        db.execute("DELETE FROM schema_migrations WHERE version = 5")
        db.execute("DROP INDEX run_usage_created")
        db.execute("ALTER TABLE run_usage DROP COLUMN created_at")
        db.execute("DROP INDEX run_tool_usage_created")
        db.execute("ALTER TABLE run_tool_usage DROP COLUMN created_at")
        db.execute("CREATE INDEX run_usage_updated ON run_usage (updated_at)")
        db.execute("CREATE INDEX run_tool_usage_updated ON run_tool_usage (updated_at)")
        db.execute("INSERT INTO run_usage VALUES ('run-1', 4, 0, 1000.0)")
        db.execute("INSERT INTO run_tool_usage VALUES ('run-1', 't', 4, 0, 1000.0)")
    db.close()
    store = SQLiteStore(database)
    try:
        with store.decision() as transaction:
            assert transaction.view(SCOPE, 0.0).usage.calls == 4
        assert store.prune(1000.0 + RUN_USAGE_RETENTION_SECONDS) == 0
        assert store.prune(1001.0 + RUN_USAGE_RETENTION_SECONDS) == 2
    finally:
        store.close()


def test_an_exception_rolls_the_transaction_back(open_store: Callable[[], Store]) -> None:
    """If the block fails, nothing it committed stays."""
    store = open_store()
    with pytest.raises(AbandonedError):
        _commit_then_fail(store)
    with store.decision() as transaction:
        assert transaction.view(SCOPE, 0.0).usage.calls == 0


class AbandonedError(Exception):
    """Raised inside a decision transaction after its changes were committed."""


def _commit_then_fail(store: Store) -> None:
    with store.decision() as transaction:
        decide_in(transaction, StateChanges(count_call=True), now=0.0, decision_id="d")
        raise AbandonedError


def test_kill_switches_engage_list_and_release(open_store: Callable[[], Store]) -> None:
    """Switches are kept with who and why, listed, seen by decisions, and released."""
    store = open_store()
    switch = KillSwitch(KillScope.TOOL, "t", "broken", "api", "olivia@example.com", 5.0)
    assert store.set_kill_switch(switch) == (switch, False)
    updated = KillSwitch(KillScope.TOOL, "t", "still broken", "api", "oscar@example.com", 5.5)
    assert store.set_kill_switch(updated) == (updated, True), "engaged again: the reason updates"
    store.set_kill_switch(switch)
    store.set_kill_switch(KillSwitch(KillScope.GLOBAL, "", "all stop", "api", "o", 6.0))
    assert [(s.scope, s.target) for s in store.kill_switches()] == [
        (KillScope.TOOL, "t"),
        (KillScope.GLOBAL, ""),
    ]
    with open_store().decision() as transaction:
        assert len(transaction.view(None, 0.0).kill_switches) == 2
    released = store.release_kill_switch(KillScope.TOOL, "t")
    assert released is not None
    assert released.engaged_by == "olivia@example.com"
    assert store.release_kill_switch(KillScope.TOOL, "t") is None
    assert [s.scope for s in store.kill_switches()] == [KillScope.GLOBAL]


def _count(path: str, times: int) -> None:
    store = SQLiteStore(Path(path) / "state.db")
    for index in range(times):
        commit(store, StateChanges(count_call=True), decision_id=f"d{index}")
    store.close()


def test_two_processes_count_exactly(tmp_path: Path) -> None:
    """Two real processes spending one run's budget at once lose no increment."""
    SQLiteStore(tmp_path / "state.db").close()
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_count, args=(str(tmp_path), 150)) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    store = SQLiteStore(tmp_path / "state.db")
    with store.decision() as transaction:
        assert transaction.view(SCOPE, 0.0).usage.calls == 300
    store.close()


def test_a_locked_store_is_unavailable_not_a_hang(tmp_path: Path) -> None:
    """When another process holds the write lock too long, the decision fails closed."""
    store = SQLiteStore(tmp_path / "state.db", busy_timeout_seconds=0.1)
    blocker = sqlite3.connect(tmp_path / "state.db", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(StoreUnavailableError), store.decision():
            pass
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
        store.close()


def test_an_unopenable_store_is_unavailable(tmp_path: Path) -> None:
    """A state file that is not a database is reported, not a traceback."""
    (tmp_path / "state.db").write_bytes(b"not a database at all" * 100)
    with pytest.raises(StoreUnavailableError):
        SQLiteStore(tmp_path / "state.db")


def _request(approval_id: str = "apr_1", *, expires_at: float = 2000.0) -> NewApproval:
    record = ApprovalRecord(
        id=approval_id,
        agent="a@service",
        tool="t",
        args_digest="sha256:1",
        run_id="run-1",
        tier="supervisor",
        approvals_required=2,
        approver_roles=("boss",),
        vetoes=1,
        status=ApprovalStatus.PENDING,
        created_at=1000.0,
        expires_at=expires_at,
    )
    return NewApproval(record, '{"amount":120}', "tok-1", "v1")


def _open(store: Store, request: NewApproval) -> None:
    scope = DecisionScope(
        agent="a@service", tool="t", run_key="run-1", args_digest="sha256:1", run_id="run-1"
    )
    with store.decision() as transaction:
        transaction.view(scope, 1000.0)
        transaction.commit(
            scope,
            StateChanges(open_approval=None),
            decision=ALLOW,
            decision_id="d",
            cost=Decimal(0),
            now=1000.0,
            idempotency_window_seconds=WINDOW,
            new_approval=request,
        )


def test_an_approval_request_round_trips_with_its_verdicts(
    open_store: Callable[[], Store],
) -> None:
    """A request is stored whole; verdicts, status and events come back in order."""
    store = open_store()
    _open(store, _request())
    with store.approvals() as transaction:
        transaction.add_verdict("apr_1", Verdict("p@x", True, ("boss",), 1001.0, "ok"))
        transaction.set_status("apr_1", ApprovalStatus.APPROVED, 1001.0)
        transaction.add_event("apr_1", "approved", "p@x", 1001.0)
    stored = store.get_approval("apr_1")
    assert stored is not None
    assert stored.record.status is ApprovalStatus.APPROVED
    assert stored.record.verdicts == (Verdict("p@x", True, ("boss",), 1001.0, "ok"),)
    assert (stored.arguments, stored.token_id, stored.policy_version) == (
        '{"amount":120}',
        "tok-1",
        "v1",
    )
    events = store.approval_events(0, 10)
    assert [(e.event, e.actor) for e in events] == [("created", "a@service"), ("approved", "p@x")]
    assert store.last_approval_event() == events[-1].seq


def test_an_open_request_is_found_for_the_same_call(open_store: Callable[[], Store]) -> None:
    """A decision for the same agent, tool, arguments and run sees the pending request."""
    store = open_store()
    _open(store, _request())
    scope = DecisionScope(
        agent="a@service",
        tool="t",
        run_key="run-1",
        args_digest="sha256:1",
        run_id="run-1",
        approval_id="apr_1",
        may_need_approval=True,
    )
    other = DecisionScope(
        agent="a@service", tool="t", run_key="run-2", args_digest="sha256:1", run_id="run-2",
        may_need_approval=True,
    )  # fmt: skip
    with store.decision() as transaction:
        view, elsewhere = transaction.view(scope, 1000.0), transaction.view(other, 1000.0)
    assert view.open_approval is not None
    assert view.open_approval.id == "apr_1"
    assert view.approval is not None
    assert elsewhere.open_approval is None


def test_listing_filters_and_pages_newest_first(open_store: Callable[[], Store]) -> None:
    """Lists filter by status and page after a given id, newest first."""
    store = open_store()
    for index in range(5):
        _open(store, _request(f"apr_{index}"))
    first = store.list_approvals(
        status=ApprovalStatus.PENDING, agent="", tool="t", limit=2, after=""
    )
    rest = store.list_approvals(
        status=ApprovalStatus.PENDING, agent="", tool="t", limit=10, after=first[-1].record.id
    )
    ids = [a.record.id for a in (*first, *rest)]
    assert sorted(ids) == [f"apr_{i}" for i in range(5)]
    assert len(set(ids)) == 5
    assert (
        store.list_approvals(status=ApprovalStatus.APPROVED, agent="", tool="", limit=10, after="")
        == []
    )
    assert store.pending_by_tier() == {"supervisor": 5}


def test_due_requests_expire_with_an_event(open_store: Callable[[], Store]) -> None:
    """Requests past their time are marked expired once, with an event."""
    store = open_store()
    _open(store, _request("apr_old", expires_at=1500.0))
    _open(store, _request("apr_new", expires_at=5000.0))
    expired = store.expire_approvals(2000.0)
    assert [a.record.id for a in expired] == ["apr_old"]
    assert store.expire_approvals(2000.0) == []
    stored = store.get_approval("apr_old")
    assert stored is not None
    assert stored.record.status is ApprovalStatus.EXPIRED
    assert store.approval_events(0, 10)[-1].event == "expired"


# ------------------------------------------------------------------ revocations


def _revocation(token_id: str, *, at: float = 100.0, expires: float = 5000.0) -> Revocation:
    return Revocation(token_id, f"reason {token_id}", "olivia@example.com", at, expires)


def _view_for(store: Store, *token_ids: str) -> StateView:
    scope = DecisionScope(agent="a@service", tool="t", run_key="r", token_ids=token_ids)
    with store.decision() as transaction:
        return transaction.view(scope, 1000.0)


def test_a_revoked_id_in_the_lineage_shows_in_the_view(open_store: Callable[[], Store]) -> None:
    """A revocation of any id of the token's lineage is read in the Check's transaction."""
    store = open_store()
    assert _view_for(store, "root", "child").revocation is None
    store.revoke(_revocation("root"))
    view = _view_for(store, "root", "child")
    assert view.revocation == _revocation("root")
    assert _view_for(store, "child").revocation is None
    assert _view_for(store).revocation is None, "no token ids, nothing to look up"
    assert store.revocation(("child", "root")) == _revocation("root")
    assert store.revocation(("child",)) is None
    assert store.revocation(()) is None


def test_the_earliest_revocation_of_a_lineage_is_reported(open_store: Callable[[], Store]) -> None:
    """With an ancestor and the token both revoked, the earlier revocation is the one shown."""
    store = open_store()
    store.revoke(_revocation("child", at=50.0))
    store.revoke(_revocation("root", at=70.0))
    assert _view_for(store, "root", "child").revocation == _revocation("child", at=50.0)


def test_the_first_revocation_stands(open_store: Callable[[], Store]) -> None:
    """Revoking twice keeps the first reason and says the second created nothing."""
    store = open_store()
    first, created = store.revoke(_revocation("t1"))
    again, created_again = store.revoke(Revocation("t1", "other", "x", 200.0, 9000.0))
    assert (created, created_again) == (True, False)
    assert first == again == _revocation("t1")


def test_revocations_outlive_the_process(open_store: Callable[[], Store]) -> None:
    """A revocation written by one store is seen by another opened later (a restart)."""
    open_store().revoke(_revocation("t1"))
    assert _view_for(open_store(), "t1").revocation == _revocation("t1")


def test_issued_tokens_are_remembered(open_store: Callable[[], Store]) -> None:
    """A minted token's agent and expiry can be looked up by id; recording twice is harmless."""
    store = open_store()
    token = IssuedToken("t1", "a@service", "orchestrator@service", 900.0, parent_id="t0")
    store.record_issued(token)
    store.record_issued(token)
    assert store.issued("t1") == token
    assert open_store().issued("t1") == token
    assert store.issued("nope") is None


def test_prune_drops_revocations_and_issued_tokens_once_expired(
    open_store: Callable[[], Store],
) -> None:
    """Records of expired tokens are pruned; those of live tokens are kept."""
    store = open_store()
    store.revoke(_revocation("old", expires=500.0))
    store.revoke(_revocation("live", expires=5000.0))
    store.record_issued(IssuedToken("old", "a", "i", 500.0))
    store.record_issued(IssuedToken("live", "a", "i", 5000.0))
    assert store.prune(1000.0) == 2
    assert _view_for(store, "old").revocation is None
    assert _view_for(store, "live").revocation is not None
    assert (store.issued("old"), store.issued("live")) == (
        None,
        IssuedToken("live", "a", "i", 5000.0),
    )


def test_an_unreadable_revocation_table_is_unavailable_not_allow(tmp_path: Path) -> None:
    """If revocations cannot be read, the view raises StoreUnavailableError (fail closed)."""
    store = SQLiteStore(tmp_path / "state.db")
    try:
        saboteur = sqlite3.connect(tmp_path / "state.db", isolation_level=None)
        saboteur.execute("DROP TABLE revocations")
        saboteur.close()
        with pytest.raises(StoreUnavailableError, match="revocations"):
            _view_for(store, "t1")
    finally:
        store.close()


def test_a_failing_write_inside_a_decision_is_unavailable(tmp_path: Path) -> None:
    """An SQLite error while committing a decision is StoreUnavailableError, rolled back."""
    store = SQLiteStore(tmp_path / "state.db")
    blocker = sqlite3.connect(tmp_path / "state.db", isolation_level=None)
    blocker.execute(
        "CREATE TRIGGER refuse BEFORE INSERT ON run_usage BEGIN SELECT RAISE(ABORT, 'no'); END"
    )
    blocker.close()
    try:
        with pytest.raises(StoreUnavailableError, match="no"):
            commit(store, StateChanges(count_call=True, failure_streak=1))
        with store.decision() as transaction:
            assert transaction.view(SCOPE, 0.0).usage.failure_streak == 0, "rolled back"
    finally:
        store.close()


def test_an_unaudited_decision_can_be_undone(open_store: Callable[[], Store]) -> None:
    """Undo forgets the decision's idempotency record and puts a consumed approval back."""
    store = open_store()
    _open(store, _request())
    with store.approvals() as transaction:
        transaction.set_status("apr_1", ApprovalStatus.CONSUMED, 1001.0)
    commit(store, StateChanges(remember=True), decision_id="dec_lost")
    store.undo_decision(SCOPE, "dec_lost", consumed_approval="apr_1", now=1002.0)
    with store.decision() as transaction:
        assert transaction.view(SCOPE, 1002.0).idempotent is None
    restored = store.get_approval("apr_1")
    assert restored is not None
    assert restored.record.status is ApprovalStatus.APPROVED
    assert store.approval_events(0, 10)[-1].event == "restored"
    store.undo_decision(SCOPE, "dec_other", consumed_approval="", now=1003.0)  # a no-op


def _hold_writer_lock(path: str, held: Any, release: Any) -> None:
    """In another process: take the writers' lock, say so, and keep it until told."""
    descriptor = os.open(path, os.O_RDWR)
    fcntl.flock(descriptor, fcntl.LOCK_EX)
    held.set()
    release.wait(30)
    os.close(descriptor)


def test_writers_of_one_directory_wait_for_each_other_and_time_out(tmp_path: Path) -> None:
    """A decision waits while another process writes, then goes on; past the timeout it fails
    closed (UNAVAILABLE), never deciding without the lock."""
    store = SQLiteStore(tmp_path / "state.db", busy_timeout_seconds=0.3)
    context = multiprocessing.get_context("spawn")
    held, release = context.Event(), context.Event()
    holder = context.Process(
        target=_hold_writer_lock, args=(str(tmp_path / "state.db.lock"), held, release)
    )
    holder.start()
    try:
        assert held.wait(30)
        started = time.monotonic()
        with pytest.raises(StoreUnavailableError, match="another writer"):
            commit(store, StateChanges(count_call=True))
        assert time.monotonic() - started >= 0.3
        threading.Timer(0.1, release.set).start()
        started = time.monotonic()
        commit(store, StateChanges(count_call=True))  # waits for the release, then writes
        assert time.monotonic() - started >= 0.05
        with store.decision() as transaction:
            assert transaction.view(SCOPE, 0.0).usage.calls == 1, "only the second one counted"
    finally:
        release.set()
        holder.join(30)
        store.close()


def _wal_bytes(database: Path) -> int:
    wal = database.with_name(database.name + "-wal")
    return wal.stat().st_size if wal.exists() else 0


def test_background_checkpoints_keep_the_wal_bounded_under_steady_commits(
    tmp_path: Path,
) -> None:
    """Passive checkpoints alone never let the WAL start over while commits keep coming; the
    checkpointer's short RESTART under the writers' lock does, so the WAL stays small."""
    database = tmp_path / "state.db"
    store = SQLiteStore(
        database,
        background_checkpoints=True,
        checkpoint_interval_seconds=0.005,
        wal_restart_frames=200,
    )
    largest = 0
    try:
        for call in range(3000):
            commit(store, StateChanges(count_call=True, rate=RateBucket(1.0, call)), now=call)
            time.sleep(0.0002)  # a Check's gap between transactions
            if call % 100 == 0:
                largest = max(largest, _wal_bytes(database))
    finally:
        store.close()
    # 3,000 commits write ~10,000 frames (40 MiB) when the WAL never starts over.
    assert largest < 1500 * 4096, largest


def test_a_store_checkpoints_on_a_thread_only_when_asked_and_stops_it_on_close(
    tmp_path: Path,
) -> None:
    """Serving processes ask for the checkpointer; the CLI's short-lived stores do not."""

    def checkpointers() -> int:
        return sum(thread.name == "state-checkpoint" for thread in threading.enumerate())

    before = checkpointers()
    plain = SQLiteStore(tmp_path / "state.db")
    assert checkpointers() == before
    serving = SQLiteStore(tmp_path / "state.db", background_checkpoints=True)
    assert checkpointers() == before + 1
    serving.close()
    plain.close()
    assert checkpointers() == before


def test_the_checkpointer_skips_a_busy_writers_lock_but_reports_a_failing_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The RESTART waits for the writers' lock for a while only; a writer holding it all that
    time skips the turn quietly, while flock itself failing is an error the thread logs."""
    database = tmp_path / "state.db"
    store = SQLiteStore(
        database,
        background_checkpoints=True,
        checkpoint_interval_seconds=3600.0,  # the thread stays idle: the test drives the turns
        wal_restart_frames=1,
    )
    checkpointer = store._checkpointer
    assert checkpointer is not None
    writer = os.open(database.with_name("state.db.lock"), os.O_RDWR)
    try:
        commit(store, StateChanges(count_call=True))
        fcntl.flock(writer, fcntl.LOCK_EX)
        started = time.monotonic()
        assert checkpointer.checkpoint() > 0, "busy: the turn is skipped"
        assert time.monotonic() - started < 1.0
        fcntl.flock(writer, fcntl.LOCK_UN)

        def broken_flock(fd: int, operation: int) -> None:
            raise OSError(errno.EIO, "I/O error")

        commit(store, StateChanges(count_call=True))
        monkeypatch.setattr(fcntl, "flock", broken_flock)  # the OS says no
        with pytest.raises(StoreUnavailableError, match=r"lock failed: .*I/O error"):
            checkpointer.checkpoint()
    finally:
        monkeypatch.undo()
        os.close(writer)
        store.close()


def test_a_store_written_by_a_newer_version_is_refused_untouched(tmp_path: Path) -> None:
    """An older proviso on a newer schema would write rows the newer one does not expect
    (e.g. counters without created_at): it refuses to open the store, and changes nothing."""
    database = tmp_path / "state.db"
    SQLiteStore(database).close()
    with sqlite3.connect(database) as db:
        db.execute("INSERT INTO schema_migrations (version) VALUES (999)")
    db.close()
    for _ in range(2):  # nothing is left open or locked by the refusal
        with pytest.raises(StoreUnavailableError, match=r"newer proviso \(schema 999; this one"):
            SQLiteStore(database)
    with sqlite3.connect(database) as db:
        assert db.execute("SELECT max(version) FROM schema_migrations").fetchone() == (999,)
    db.close()


def test_a_reader_holding_a_snapshot_does_not_stall_commits(tmp_path: Path) -> None:
    """A reader on an old snapshot (a sqlite3 shell, a backup) keeps the WAL from starting
    over. The checkpointer's RESTART then gives up at once and backs off, instead of holding
    the writers' lock while it waits for the reader at every turn."""
    database = tmp_path / "state.db"
    store = SQLiteStore(
        database,
        background_checkpoints=True,
        checkpoint_interval_seconds=0.005,
        wal_restart_frames=50,
    )
    commit(store, StateChanges(count_call=True))
    reader = sqlite3.connect(database, isolation_level=None)
    slow = 0
    try:
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM run_usage").fetchone()  # the snapshot is taken
        deadline = time.monotonic() + 1.5
        call = 0
        while time.monotonic() < deadline:
            call += 1
            started = time.monotonic()
            commit(store, StateChanges(count_call=True, rate=RateBucket(1.0, call)), now=call)
            slow += time.monotonic() - started > 0.03
            time.sleep(0.0003)
    finally:
        reader.execute("COMMIT")
        reader.close()
        store.close()
    assert slow <= 3, f"{slow} commits waited > 30 ms"
