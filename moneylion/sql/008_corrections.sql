-- Corrections (corrections.py): a file can be retracted, restored or replaced after it loaded,
-- and the warehouse then equals the one built from the remaining files in order. The rules that
-- need other rows (rules.py) are decided again for the ids the correction touches, from every
-- candidate row of those ids: a row that passed its file's own rules and the rule within its
-- file (one per id and file).
--
-- A transaction's candidates are its row in `transactions` and its rows here: those that did
-- not load (a `duplicate` or `conflicts_with_stored` when their file came), with their line for
-- the reject they may become again; and the rows of a file taken out by a correction, kept so
-- that it can be restored (line_number NULL: a row that loaded when its file came, whose line
-- was not kept). A row may be here and in `transactions` (it loaded after a correction).
CREATE TABLE IF NOT EXISTS transaction_candidates AS
SELECT *, CAST(NULL AS BIGINT) AS line_number, CAST(NULL AS VARCHAR) AS raw_line
FROM transactions WHERE false;

-- A user's candidates are its row in `users` (the latest file's profile) and its other versions
-- here: the profiles a later file replaced, the same profile sent again (`duplicate`), those of
-- files taken out by a correction.
CREATE TABLE IF NOT EXISTS user_versions AS
SELECT user_id, signup_date, country, file_id FROM users WHERE false;

-- One row per correction, in the order they committed. change_id comes from file_id_seq, so that
-- files and corrections share one order (the API's change token, the export's watermark).
CREATE TABLE IF NOT EXISTS corrections (
    change_id  BIGINT PRIMARY KEY,
    action     VARCHAR NOT NULL,   -- 'retract' | 'restore' | 'replace' | 'hold' | 'release'
    file_id    BIGINT NOT NULL,    -- the file it acted on
    by_file_id BIGINT,             -- replace: the file that took its place
    reason     VARCHAR,
    made_at    TIMESTAMP NOT NULL,
    rows_out   BIGINT NOT NULL DEFAULT 0,  -- base rows it took out
    rows_in    BIGINT NOT NULL DEFAULT 0   -- base rows it put in (later rows decided again)
);

-- A file's place in the order the cross-file rules follow: its file_id, unless it replaced
-- another file (then the replaced file's place).
CREATE TABLE IF NOT EXISTS file_order (
    file_id   BIGINT PRIMARY KEY,
    order_key BIGINT NOT NULL
);
