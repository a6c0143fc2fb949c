"""Litestar API over the warehouse: ``create_app(config, db)``."""

from moneylion.api.app import create_app

__all__ = ["create_app"]
