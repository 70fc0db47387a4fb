-- Revoked capability tokens by id (jti). A Check whose token, or any ancestor of it, is here
-- is denied TOKEN_REVOKED. expires_at is when that token has expired for good (leeway
-- included), so every descendant has too, and the row can be pruned.
CREATE TABLE revocations (
    token_id   TEXT PRIMARY KEY,
    reason     TEXT NOT NULL,
    revoked_by TEXT NOT NULL,
    revoked_at REAL NOT NULL,
    expires_at REAL NOT NULL
);
CREATE INDEX revocations_expiry ON revocations (expires_at);

-- Tokens this sidecar minted (IssueToken, AttenuateToken, the CLI with the local key): which
-- agent each is for, so an issuer can revoke by id only what it may mint, and until when a
-- revocation must be kept.
CREATE TABLE issued_tokens (
    token_id   TEXT PRIMARY KEY,
    agent      TEXT NOT NULL,
    issued_by  TEXT NOT NULL,
    parent_id  TEXT NOT NULL,
    expires_at REAL NOT NULL
);
CREATE INDEX issued_tokens_expiry ON issued_tokens (expires_at);
