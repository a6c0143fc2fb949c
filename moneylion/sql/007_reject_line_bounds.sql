-- A reject's raw line is kept up to Config.reject_line_bytes bytes (resolve.insert_rejects):
-- beside it, the line's own length in bytes (NULL: a line_too_long reject, which holds only the
-- line's start) and whether what is kept was cut. Rejects stored before keep their line whole.
-- Written to be applied again safely (a warehouse's recorded version can be behind its tables).
ALTER TABLE rejects ADD COLUMN IF NOT EXISTS raw_line_bytes BIGINT;
ALTER TABLE rejects ADD COLUMN IF NOT EXISTS raw_line_truncated BOOLEAN DEFAULT false;
UPDATE rejects SET raw_line_bytes = strlen(raw_line)
WHERE raw_line_bytes IS NULL AND reason <> 'line_too_long';
UPDATE rejects SET raw_line_truncated = (reason = 'line_too_long')
WHERE raw_line_truncated IS NULL OR reason = 'line_too_long';
