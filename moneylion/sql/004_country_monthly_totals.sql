-- Per month (its first day), country and type: the count and total of the transactions. The
-- country is the user's current one (NULL: the user is not known, an orphan), so a profile that
-- changes country or arrives late moves that user's totals (aggregates.py).
-- file_id: the last file whose commit changed the row, so an export copies only the rows changed
-- since its watermark. A row whose count falls to 0 stays, with a zero total, until a recompute:
-- then an export sees that it changed and removes it from the SQLite file.
-- No key: a PRIMARY KEY cannot take the NULL country of orphans (deltas MERGE on the three).
CREATE TABLE country_monthly_totals (
    month            DATE NOT NULL,
    country          VARCHAR,
    transaction_type transaction_type NOT NULL,
    tx_count         BIGINT NOT NULL,
    total_amount     DECIMAL(38, 2) NOT NULL,
    file_id          BIGINT NOT NULL
);

-- A warehouse that already has transactions starts with its totals (this migration's frozen
-- copy of the definition in aggregates.py, which `moneylion verify` holds it to).
INSERT INTO country_monthly_totals
SELECT CAST(date_trunc('month', t.transaction_date) AS DATE), u.country, t.transaction_type,
       count(*), CAST(sum(t.amount) AS DECIMAL(38, 2)),
       (SELECT coalesce(max(file_id), 0) FROM files)
FROM transactions t LEFT JOIN users u ON u.user_id = t.user_id
GROUP BY ALL;
