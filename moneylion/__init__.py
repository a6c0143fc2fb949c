"""moneylion: CSV files dropped in an inbox -> exact, always-current aggregates over HTTP."""

__version__ = "0.1.0"
