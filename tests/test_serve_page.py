"""Issue 18.5: the status page in a real headless browser (Debian's chromium, driven by playwright-python).

Playwright's own browser download needs the network; CI installs Debian's chromium in ``.ci/run`` instead.
Without chromium (or playwright) the test is skipped with the reason, except under POSSTATE_CI=1, where it fails.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from posstate import StateConfig
from tests.serve_support import pos, require, serving

require("starlette", "uvicorn", "prometheus_client", "httpx", "websockets", "playwright")

#: Debian's chromium; POSSTATE_CHROMIUM names another binary (then only that one is tried).
CHROMIUM = os.environ.get("POSSTATE_CHROMIUM", "/usr/bin/chromium")
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
STATIC = Path(__file__).resolve().parent.parent / "posstate" / "serve" / "static"


def _chromium() -> str:
    found = CHROMIUM if os.path.exists(CHROMIUM) else None
    if found is None and "POSSTATE_CHROMIUM" not in os.environ:
        found = shutil.which("chromium")
    if found is None:
        if os.environ.get("POSSTATE_CI") == "1":
            pytest.fail(f"chromium not found at {CHROMIUM} (CI: .ci/run installs it with apt-get)")
        pytest.skip(f"chromium not found at {CHROMIUM}: apt-get install chromium (CI fails here instead)")
    return found


def test_the_page_loads_nothing_from_outside() -> None:
    """issue 18.5: plain HTML, CSS and a script with no external resource (works offline)."""
    for name in ("index.html", "status.js", "status.css"):
        text = (STATIC / name).read_text()
        assert not re.search(r"(?<![\w.])(https?:)?//[a-z0-9]", text.replace("ws://", "").replace("wss://", "")), name


def test_status_page_shows_positions_and_follows_the_bot(manager: Any, cfg: StateConfig, tmp_path: Path) -> None:
    """issue 18.5: in headless chromium the page shows the positions, health and backups, and updates over the
    WebSocket when the bot changes a position; every request it makes goes to the server itself."""
    from playwright.sync_api import sync_playwright

    executable = _chromium()
    m = manager()
    m.load_positions()
    m.set_position(pos("BTC/USDT", 1))
    m.set_symbol_metadata("BTC/USDT", {"note": "<script>alert(1)</script>"})
    m.save()
    with serving(m) as server, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 800})
            requests: list[str] = []
            page.on("request", lambda r: requests.append(r.url))
            dialogs: list[str] = []
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            page.goto(server.url + "/")
            row = page.locator('#positions tr[data-key="BTC/USDT|long"] td')
            row.nth(2).wait_for()
            assert row.nth(2).text_content() == "1"
            page.locator("#conn[data-state=live]").wait_for()
            page.locator("#health.ok").wait_for()
            page.locator("#backups li").first.wait_for()
            m.set_position(pos("BTC/USDT", 7))
            page.wait_for_function(
                "() => document.querySelector('#positions tr[data-key=\"BTC/USDT|long\"] td:nth-child(3)')?.textContent === '7'"
            )
            assert "<script>" in (page.locator("#metadata").text_content() or "")  # shown as text, never run
            page.screenshot(path=str(tmp_path / "status.png"), full_page=True)
            if os.environ.get("POSSTATE_SCREENSHOT"):
                page.screenshot(path=os.environ["POSSTATE_SCREENSHOT"], full_page=True)
        finally:
            browser.close()
    assert dialogs == []
    assert requests and all(u.startswith(server.url) or u.startswith(server.url.replace("http", "ws")) for u in requests), (
        requests
    )


def test_status_page_after_a_resync_and_a_batch_shows_the_stores_state(monkeypatch: pytest.MonkeyPatch) -> None:
    """issue 18.3 attack: in headless chromium, a batch of several changes (one deleted position among them) is
    applied whole, and after a ``resync`` (the server fell behind the store) the page reconnects and shows the
    store's state from the fresh snapshot."""
    from playwright.sync_api import sync_playwright

    from posstate import AccountStateStore
    from posstate.serve.sources import StoreSource
    from posstate.serve.stream import StreamOptions

    executable = _chromium()
    monkeypatch.setattr(StoreSource, "SUBSCRIPTION", 4)
    store = AccountStateStore()
    store.set_active_position(pos("BTC/USDT", 1))
    store.set_active_position(pos("XRP/USDT", 1))

    def cell(key: str) -> str:
        return f"document.querySelector('#positions tr[data-key=\"{key}\"] td:nth-child(3)')"

    with (
        serving(store, poll_interval=3600.0, stream=StreamOptions(heartbeat_interval=0.2)) as server,
        sync_playwright() as p,
    ):
        browser = p.chromium.launch(executable_path=executable, args=ARGS, headless=True)
        try:
            page = browser.new_page()
            page.goto(server.url + "/")
            page.locator("#conn[data-state=live]").wait_for()
            page.wait_for_function(f"() => {cell('XRP/USDT|long')}?.textContent === '1'")
            store.set_active_position(pos("BTC/USDT", 2))
            store.delete_active_position("XRP/USDT", "long")
            store.set_active_position(pos("ETH/USDT", 3))
            server.source.poll()  # one batch of three changes (the subscription holds 4)
            page.wait_for_function(
                f"() => {cell('BTC/USDT|long')}?.textContent === '2' && {cell('ETH/USDT|long')}?.textContent === '3'"
                f" && {cell('XRP/USDT|long')} === null"
            )
            for i in range(10):  # more than the server's subscription holds: every client gets resync
                store.set_active_position(pos("SOL/USDT", i + 1))
            server.source.poll()
            assert server.source.dropped >= 1
            page.wait_for_function(f"() => {cell('SOL/USDT|long')}?.textContent === '10'")
            page.locator("#conn[data-state=live]").wait_for()
        finally:
            browser.close()
