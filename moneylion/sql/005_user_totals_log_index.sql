-- A few users' totals are read by point lookups: the candidates of the top list after each
-- commit, a user's summary. The log is compacted by creating a new table, so compaction makes
-- this index again from the catalog's description (aggregates.py).
CREATE INDEX IF NOT EXISTS user_totals_log_user ON user_totals_log (user_id);
