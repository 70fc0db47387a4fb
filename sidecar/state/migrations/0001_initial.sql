-- Kill switches engaged through the admin API (policy switches live in the policy).
CREATE TABLE kill_switches (
    scope      TEXT NOT NULL,
    target     TEXT NOT NULL,
    reason     TEXT NOT NULL,
    engaged_by TEXT NOT NULL,
    engaged_at REAL NOT NULL,
    PRIMARY KEY (scope, target)
);

-- The decision recorded for an idempotency key, per agent (Stripe semantics).
CREATE TABLE idempotency_keys (
    agent       TEXT NOT NULL,
    key         TEXT NOT NULL,
    tool        TEXT NOT NULL,
    args_digest TEXT NOT NULL,
    decision    TEXT NOT NULL,
    decision_id TEXT NOT NULL,
    created_at  REAL NOT NULL,
    expires_at  REAL NOT NULL,
    PRIMARY KEY (agent, key)
);
CREATE INDEX idempotency_keys_expiry ON idempotency_keys (expires_at);

-- Budget usage per run (or per token, as 'token <jti>', for Checks without a run id; proviso
-- before 2026-11-25 wrote 'token:<jti>', which a run id could spell).
CREATE TABLE run_usage (
    run_key    TEXT PRIMARY KEY,
    calls       INTEGER NOT NULL,
    cost_micros INTEGER NOT NULL,  -- cost in millionths: exact integer sums, no floats
    updated_at  REAL NOT NULL
);
CREATE TABLE run_tool_usage (
    run_key        TEXT NOT NULL,
    tool           TEXT NOT NULL,
    calls          INTEGER NOT NULL,
    failure_streak INTEGER NOT NULL,
    updated_at     REAL NOT NULL,
    PRIMARY KEY (run_key, tool)
);
CREATE INDEX run_usage_updated ON run_usage (updated_at);
CREATE INDEX run_tool_usage_updated ON run_tool_usage (updated_at);

-- Token buckets of per-agent rate limits.
CREATE TABLE rate_buckets (
    agent      TEXT PRIMARY KEY,
    tokens     REAL NOT NULL,
    updated_at REAL NOT NULL
);
