-- An agent's pending approval requests, counted when one of its calls would open another
-- (MAX_PENDING_APPROVALS_PER_AGENT): only pending rows are indexed, so the count does not
-- grow with the history that closed requests leave.
CREATE INDEX approvals_pending_agent ON approvals (agent, expires_at) WHERE status = 'pending';
