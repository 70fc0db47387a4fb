-- Approval requests, each bound to one exact call (agent, tool, arguments digest, run).
CREATE TABLE approvals (
    id                 TEXT PRIMARY KEY,
    agent              TEXT NOT NULL,
    tool               TEXT NOT NULL,
    args_digest        TEXT NOT NULL,
    run_id             TEXT NOT NULL,
    arguments          TEXT NOT NULL,  -- canonical JSON, shown to approvers
    tier               TEXT NOT NULL,
    approvals_required INTEGER NOT NULL,
    approver_roles     TEXT NOT NULL,  -- JSON list
    vetoes             INTEGER NOT NULL,
    status             TEXT NOT NULL,
    created_at         REAL NOT NULL,
    expires_at         REAL NOT NULL,
    closed_at          REAL,
    token_id           TEXT NOT NULL,
    policy_version     TEXT NOT NULL
);
CREATE INDEX approvals_call ON approvals (agent, tool, args_digest, run_id, status);
CREATE INDEX approvals_status ON approvals (status, created_at);

-- Each person's verdict; one per person per request (a person counts once).
CREATE TABLE approval_verdicts (
    approval_id TEXT NOT NULL REFERENCES approvals (id),
    approver    TEXT NOT NULL,
    approve     INTEGER NOT NULL,
    roles       TEXT NOT NULL,  -- JSON list: the eligible approver roles held at the time
    comment     TEXT NOT NULL,
    at          REAL NOT NULL,
    PRIMARY KEY (approval_id, approver)
);

-- Every change, in order: the history kept after a request closes, and the Watch feed.
CREATE TABLE approval_events (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    approval_id TEXT NOT NULL,
    event       TEXT NOT NULL,  -- created, approved, rejected, consumed, expired
    actor       TEXT NOT NULL,
    at          REAL NOT NULL
);
