-- An inbox entry that is refused without being read (a link, a pipe, a file over
-- max_file_bytes) has no bytes, hence no sha256: its ledger row holds NULL there (UNIQUE still
-- holds for every sha256 that exists).
ALTER TABLE files ALTER COLUMN sha256 DROP NOT NULL;
