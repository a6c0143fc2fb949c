-- Per-user totals become a log: each file appends one row per user it touched, and the view
-- user_totals sums them. A small file then only appends (no read-modify-write of the users it
-- touched, the larger part of a small file's commit); the log is compacted back to one row per user by
-- large files and once enough rows have been appended (aggregates.py).
CREATE TABLE user_totals_log AS
SELECT user_id, tx_count, total_amount, total_deposit, total_withdrawal, total_purchase,
       first_date, last_date, CAST(0 AS BIGINT) AS file_id
FROM user_totals;

DROP TABLE user_totals;

CREATE VIEW user_totals AS
SELECT user_id,
       CAST(sum(tx_count) AS BIGINT) AS tx_count,
       sum(total_amount) AS total_amount,
       sum(total_deposit) AS total_deposit,
       sum(total_withdrawal) AS total_withdrawal,
       sum(total_purchase) AS total_purchase,
       min(first_date) AS first_date,
       max(last_date) AS last_date
FROM user_totals_log
GROUP BY user_id;
