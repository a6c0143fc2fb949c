"""Lake mode: several daemons share one Delta Lake (``lake_uri``); each is a replica of it.

* ``tables.py``: the four Delta tables and their schemas, derived from ``model.py`` and the
  ledger's declaration;
* ``store.py``: the lake on disk (or object store): appends, the ledger's exact-version commit,
  reads of a file's rows, maintenance and status;
* ``publish.py``: a daemon's reading side: validate a file, write its rows, then its ledger row;
* ``apply.py`` / ``tailer.py``: the replica side: every committed file, in ledger order, into
  the local DuckDB warehouse with the same incremental code as local mode.
"""
