-- Run counters are pruned through an index on when they were created, which a Check's update
-- never touches, instead of one on updated_at, which every Check rewrote (two B-tree pages
-- fewer per commit). A counter is dropped once untouched for a week and created more than a
-- week ago (or after now, if the clock stepped back): while the clock only moves forward,
-- created_at <= updated_at and that is "untouched for a week", as before; after a backward
-- step a counter may be kept up to a week longer, never dropped sooner.
ALTER TABLE run_usage ADD COLUMN created_at REAL NOT NULL DEFAULT 0;
ALTER TABLE run_tool_usage ADD COLUMN created_at REAL NOT NULL DEFAULT 0;
-- Not needed for correctness (0 would be pruned alike): it keeps the index meaningful.
UPDATE run_usage SET created_at = updated_at;
UPDATE run_tool_usage SET created_at = updated_at;
DROP INDEX run_usage_updated;
DROP INDEX run_tool_usage_updated;
CREATE INDEX run_usage_created ON run_usage (created_at);
CREATE INDEX run_tool_usage_created ON run_tool_usage (created_at);
