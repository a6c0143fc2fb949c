-- A file taken while its producer was not done with it (an event log appended again and again,
-- a writer that paused) is tailed by inode: the bytes written into it later load as its next
-- parts (tail.py). Each part is a ledger row of its own in `files` (its rows, rejects and
-- aggregate deltas commit with it, like any file's; its sha256 is that of the file's bytes from
-- offset 0 through the part's end); this table says which file it continues and which bytes of
-- it it holds. A file's first part has no row here: it is its `files` row, bytes 0..size_bytes.
CREATE TABLE IF NOT EXISTS file_parts (
    file_id       BIGINT PRIMARY KEY,  -- the part's ledger row
    first_file_id BIGINT NOT NULL,     -- the ledger row of the file's first part
    part          INTEGER NOT NULL,    -- 2, 3, ...
    offset_start  BIGINT NOT NULL,     -- bytes [offset_start, offset_end) of the file
    offset_end    BIGINT NOT NULL
);

-- One row per file, whatever its parts: the bytes loaded so far, how many parts, and the sha256
-- of those bytes (its last part's: once the file is finished, the whole file's).
CREATE OR REPLACE VIEW whole_files AS
SELECT coalesce(p.first_file_id, f.file_id) AS file_id,
       arg_max(f.name, coalesce(p.part, 1)) AS name,
       arg_max(f.sha256, coalesce(p.part, 1)) AS sha256,
       max(coalesce(p.part, 1)) AS parts,
       max(coalesce(p.offset_end, f.size_bytes)) AS bytes_loaded,
       CAST(sum(f.rows_loaded) AS BIGINT) AS rows_loaded,
       CAST(sum(f.rows_duplicate) AS BIGINT) AS rows_duplicate,
       CAST(sum(f.rows_rejected) AS BIGINT) AS rows_rejected,
       max(f.finished_at) AS finished_at
FROM files f LEFT JOIN file_parts p USING (file_id)
GROUP BY 1;
