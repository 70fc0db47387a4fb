-- The run an idempotency key was used in: a replay is for the same call in the same run, so
-- the key in another run is a conflict (an approval used in one run must not replay in
-- another). Rows written before this column read '' and conflict with any named run.
ALTER TABLE idempotency_keys ADD COLUMN run_id TEXT NOT NULL DEFAULT '';
