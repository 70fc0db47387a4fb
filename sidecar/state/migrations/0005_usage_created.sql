-- Run counters are pruned through an index on when they were created, which a Check's update
-- never touches, instead of one on updated_at, which every Check rewrote (two B-tree pages
-- fewer per commit). A counter is dropped once created_at and updated_at are both a week old;
-- as created_at <= updated_at, that is exactly "untouched for a week", as before.
ALTER TABLE run_usage ADD COLUMN created_at REAL NOT NULL DEFAULT 0;
ALTER TABLE run_tool_usage ADD COLUMN created_at REAL NOT NULL DEFAULT 0;
UPDATE run_usage SET created_at = updated_at;
UPDATE run_tool_usage SET created_at = updated_at;
DROP INDEX run_usage_updated;
DROP INDEX run_tool_usage_updated;
CREATE INDEX run_usage_created ON run_usage (created_at);
CREATE INDEX run_tool_usage_created ON run_tool_usage (created_at);
