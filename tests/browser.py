"""The system's chromium, driven by Playwright, for the dashboard tests.

Playwright's own browser builds are never downloaded (``playwright install`` needs a network):
the tests launch Debian's ``chromium`` by path. Without it the tests are skipped on a
developer's machine and fail under ``CI=true`` (``.ci/run`` installs it with apt-get).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_path() -> str:
    """The system chromium, or a skip (a failure under CI=true) saying how to get it."""
    found = os.environ.get("MONEYLION_CHROMIUM") or shutil.which("chromium")
    if found is None:
        message = "chromium not found: apt-get install -y --no-install-recommends chromium"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true and {message}")
        pytest.skip(message)
    return found


@contextmanager
def chromium() -> Iterator[Any]:
    """A headless chromium browser (Playwright's sync API), closed at the end."""
    executable = chromium_path()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:  # a dev dependency: make install brings it
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true and playwright is not installed: {exc}")
        pytest.skip(f"playwright is not installed: {exc}")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()
