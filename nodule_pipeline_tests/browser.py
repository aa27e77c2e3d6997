"""Debian's chromium driven by Playwright, for the browser tests (``playwright install`` is not
needed: the system's chromium is launched by path)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from playwright import sync_api

CHROMIUM = Path(os.environ.get("NODULE_PIPELINE_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
UI_TIMEOUT_MS = 60_000  # a page on 2 busy cores


@pytest.fixture(scope="module")
def browser():
    """One chromium for a test module."""
    with sync_api.sync_playwright() as playwright:
        executable = str(CHROMIUM) if CHROMIUM.exists() else None  # else Playwright's own build
        try:
            browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        except sync_api.Error as error:
            if os.environ.get("CI"):  # .ci/run installs chromium: its absence there is a failure
                raise
            pytest.skip(f"no Chromium to drive: {error.message.splitlines()[0]}")
        sync_api.expect.set_options(timeout=UI_TIMEOUT_MS)
        yield browser
        browser.close()
