"""Take docs/serve-status.png: a demo account store (persisted through a manager) served on 127.0.0.1 and its
status page photographed in headless Debian chromium. Run: ``python scripts/serve_screenshot.py [OUT.png]``."""

from __future__ import annotations

import sys
import tempfile
from decimal import Decimal as D
from pathlib import Path

from playwright.sync_api import sync_playwright

from posstate import Order, PersistedAccountStateStore, Position, PositionStateManager, StateConfig, generate_key

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]
ARGS += ["--disable-sync", "--no-first-run"]


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / "docs" / "serve-status.png")
    with tempfile.TemporaryDirectory() as d, PositionStateManager(StateConfig.in_dir(Path(d) / "state"), key=generate_key()) as m:
        m.load_positions()
        store = PersistedAccountStateStore(m)
        store.set_wallet_balance("25000")
        for sym, side, c, e, lev in [
            ("BTC/USDT:USDT", "long", "0.5", "61250.5", "5"),
            ("ETH/USDT:USDT", "short", "4", "3120.25", "3"),
            ("SOL/USDT:USDT", "long", "120", "142.10", "2"),
        ]:
            store.set_active_position(Position(symbol=sym, side=side, contracts=D(c), entry_price=D(e), leverage=D(lev)))  # type: ignore[arg-type]
        for sym, px in [("BTC/USDT:USDT", "61800"), ("ETH/USDT:USDT", "3101.5"), ("SOL/USDT:USDT", "139.9")]:
            store.process_price_event(sym, px)
        store.upsert_active_order(
            Order(
                id="8812731", symbol="BTC/USDT:USDT", side="sell", type="limit", status="NEW", amount=D("0.5"), price=D("64000")
            )
        )
        store.upsert_active_order(
            Order(
                id="8812795",
                symbol="ETH/USDT:USDT",
                side="buy",
                type="limit",
                status="PARTIALLY_FILLED",
                amount=D(4),
                filled=D("1.5"),
                price=D(2950),
            )
        )
        store.set_symbol_metadata("BTC/USDT:USDT", {"grid_step": "250", "tp_order": "8812731"})
        m.save()
        with store.serve(port=0) as server, sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)
            page = browser.new_page(viewport={"width": 1100, "height": 600})
            page.goto(server.url + "/")
            page.locator("#conn[data-state=live]").wait_for()
            page.locator("#backups li").first.wait_for()
            page.screenshot(path=str(out), full_page=True)
            browser.close()
        store.close()
    print(out)


if __name__ == "__main__":
    main()
