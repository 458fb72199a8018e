"""Debian's headless Chromium driven by Playwright's Python package (``executable_path``:
never a downloaded browser build), for the web UI's tests: open pages, evaluate
JavaScript, click, and collect what went wrong (console errors, uncaught exceptions,
failed requests) and every request the pages made."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

from playwright.sync_api import sync_playwright


class Page:
    def __init__(self, page: Any) -> None:
        self.page = page
        #: Console errors, uncaught exceptions, failed requests and error answers.
        self.errors: list[str] = []
        #: The path (and query) of every request the pages made.
        self.requests: list[str] = []
        page.on("console", self._console)
        page.on("pageerror", lambda exc: self.errors.append(f"uncaught: {exc}"))
        page.on("requestfailed", self._failed)
        page.on("response", self._response)
        page.on("request", lambda r: self.requests.append(r.url.split("://", 1)[-1]))

    def _console(self, message: Any) -> None:
        if message.type in ("error", "assert"):
            self.errors.append(f"console: {message.text}")

    def _failed(self, request: Any) -> None:
        # a request cut short by leaving the page (the event stream, an icon) is no error
        if "ERR_ABORTED" not in str(request.failure):
            self.errors.append(f"failed: {request.url} {request.failure}")

    def _response(self, response: Any) -> None:
        if response.status >= 400:
            self.errors.append(f"{response.status}: {response.url}")

    def goto(self, url: str) -> None:
        self.page.goto(url, wait_until="load")

    def evaluate(self, expression: str) -> Any:
        return self.page.evaluate(expression)

    def wait_for(self, expression: str, timeout: float = 30.0) -> Any:
        """Evaluate ``expression`` until it is truthy (bounded by ``timeout``)."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {expression}")
            time.sleep(0.1)


@contextlib.contextmanager
def browser(chromium: str, url: str, **context: Any) -> Iterator[Page]:
    """A headless Chromium (Debian's, at ``chromium``) with ``url`` open."""
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=chromium, args=["--no-sandbox", "--disable-dev-shm-usage"]
        )
        try:
            page = Page(launched.new_context(**context).new_page())
            page.goto(url)
            yield page
        finally:
            launched.close()
