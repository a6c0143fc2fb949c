-- Base tables, the file ledger, rejects and the maintained aggregates.
CREATE TYPE transaction_type AS ENUM ('deposit', 'withdrawal', 'purchase');

CREATE SEQUENCE file_id_seq START 1;

CREATE TABLE files (
    file_id        BIGINT PRIMARY KEY,
    name           VARCHAR NOT NULL,
    sha256         VARCHAR NOT NULL UNIQUE,
    kind           VARCHAR,            -- 'users' | 'transactions' | NULL when the header is unusable
    status         VARCHAR NOT NULL,   -- 'loaded' | 'failed'
    rows_total     BIGINT NOT NULL DEFAULT 0,
    rows_loaded    BIGINT NOT NULL DEFAULT 0,
    rows_duplicate BIGINT NOT NULL DEFAULT 0,
    rows_rejected  BIGINT NOT NULL DEFAULT 0,
    size_bytes     BIGINT NOT NULL DEFAULT 0,
    received_at    TIMESTAMP NOT NULL,
    finished_at    TIMESTAMP NOT NULL,
    seconds        DOUBLE NOT NULL DEFAULT 0,
    error_reason   VARCHAR,
    error          VARCHAR
);

CREATE TABLE users (
    user_id     BIGINT PRIMARY KEY,
    signup_date DATE NOT NULL,
    country     VARCHAR NOT NULL,
    file_id     BIGINT NOT NULL,
    updated_at  TIMESTAMP NOT NULL
);

-- No PRIMARY KEY: ingest keeps ids unique itself (a clean file is checked in one pass, any
-- other goes through validate_rows), and an index costs time and memory on every large append
-- (docs/performance.md).
CREATE TABLE transactions (
    transaction_id   BIGINT NOT NULL,
    user_id          BIGINT NOT NULL,
    transaction_date DATE NOT NULL,
    amount           DECIMAL(18, 2) NOT NULL,
    transaction_type transaction_type NOT NULL,
    file_id          BIGINT NOT NULL
);

CREATE TABLE rejects (
    file_id     BIGINT NOT NULL,
    line_number BIGINT NOT NULL,
    reason      VARCHAR NOT NULL,
    message     VARCHAR NOT NULL,
    raw_line    VARCHAR
);

-- No PRIMARY KEY: a large delta rebuilds the table (FULL JOIN), a small one updates in place;
-- an index made the upsert of a large file's users markedly slower.
CREATE TABLE user_totals (
    user_id          BIGINT NOT NULL,
    tx_count         BIGINT NOT NULL,
    total_amount     DECIMAL(38, 2) NOT NULL,
    total_deposit    DECIMAL(38, 2) NOT NULL,
    total_withdrawal DECIMAL(38, 2) NOT NULL,
    total_purchase   DECIMAL(38, 2) NOT NULL,
    first_date       DATE NOT NULL,
    last_date        DATE NOT NULL
);

CREATE TABLE daily_totals (
    transaction_date DATE NOT NULL,
    transaction_type transaction_type NOT NULL,
    tx_count         BIGINT NOT NULL,
    total_amount     DECIMAL(38, 2) NOT NULL,
    PRIMARY KEY (transaction_date, transaction_type)
);

-- The best-ranked users by transaction count (ties: smaller user_id first), kept to
-- Config.top_users_kept rows. Counts only grow, so each file re-ranks the old list plus the
-- users it touched, never the whole user_totals table.
CREATE TABLE top_users (
    rank     INTEGER NOT NULL,  -- no key: the list is replaced whole in one transaction
    user_id  BIGINT NOT NULL,
    tx_count BIGINT NOT NULL
);
