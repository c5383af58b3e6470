"""The README's main job: a bot saving positions is killed with SIGKILL mid-run and resumes from its last save.

``run_demo()`` plays the operator: it starts a real bot process (``python -m posstate.cli.demo bot DIR``) that
trades a few symbols and saves after every change, reads each generation the bot reports as saved, kills
it with SIGKILL at a random moment (possibly in the middle of a save), starts a fresh manager on the same
directory and checks that it holds exactly the last acknowledged save (or the one that was in flight).
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

from posstate.core.config import StateConfig
from posstate.manager.manager import PositionStateManager
from posstate.model.position import Position, PositionKey, Side
from posstate.storage.crypto import encode_key_text, generate_key

SIDES: tuple[Side, Side] = ("long", "short")
SYMBOLS = ("BTC/USDT:USDT", "ETH/USDT:USDT", "SOL/USDT:USDT", "XRP/USDT:USDT", "DOGE/USDT:USDT")


def state_digest(positions: dict[PositionKey, Position], metadata: dict[str, dict[str, object]]) -> str:
    """A digest of positions and metadata, the same in the bot and in the checker."""
    h = hashlib.sha256()
    for key in sorted(positions):
        h.update(repr(sorted(positions[key].to_dict().items())).encode())
    for sym in sorted(metadata):
        h.update(sym.encode() + repr(sorted(metadata[sym].items())).encode())
    return h.hexdigest()[:16]


def _bot(state_dir: str, seed: int) -> int:
    """The bot: open, scale and close positions on a random walk; save after each tick; report each save."""
    rng = random.Random(seed)
    out = sys.stdout
    with PositionStateManager(StateConfig.in_dir(state_dir, backup_interval=3600, durability="snapshot")) as m:
        positions = m.load_positions()
        out.write(f"START {m.generation} {len(positions)}\n")
        out.flush()
        price = {s: Decimal(rng.randint(1, 60000)) for s in SYMBOLS}
        while True:
            sym = rng.choice(SYMBOLS)
            side: Side = rng.choice(SIDES)
            price[sym] = (price[sym] * Decimal(rng.randint(990, 1010)) / 1000).quantize(Decimal("0.01"))
            current = m.get_position(sym, side)
            meta = m.get_symbol_metadata(sym) or {"entries_long": 0, "entries_short": 0}
            if current is not None and rng.random() < 0.3:
                m.delete_position(sym, side)
                meta["last_close_price"] = str(price[sym])
            else:
                size = (current.contracts if current else Decimal(0)) + Decimal(rng.randint(1, 100)) / 100
                m.set_position(
                    Position(
                        symbol=sym,
                        side=side,
                        contracts=size,
                        entry_price=price[sym],
                        mark_price=price[sym],
                        leverage=Decimal(5),
                        timestamp=int(time.time() * 1000),
                    )
                )
                meta[f"entries_{side}"] = int(meta.get(f"entries_{side}", 0)) + 1
                meta.setdefault("first_open_ms", int(time.time() * 1000))
            m.set_symbol_metadata(sym, meta)
            generation = m.save()
            out.write(f"ACK {generation} {state_digest(m.get_positions(), m.get_all_symbol_metadata())}\n")
            out.flush()


def run_demo(
    *, state_dir: str | None = None, saves: int | None = None, seed: int | None = None, echo: Callable[[str], None] = print
) -> bool:
    """Run the demo; returns True when the restarted bot holds exactly what it last saved."""
    rng = random.Random(seed)
    workdir = Path(state_dir) if state_dir else Path(tempfile.mkdtemp(prefix="posstate-demo-"))
    key = generate_key()
    env = dict(os.environ, POSSTATE_KEY=encode_key_text(key))
    kill_after = saves if saves is not None else rng.randint(40, 120)
    echo(f"posstate demo: state in {workdir} (AES-256-GCM key generated for this run)")
    echo(
        f"[operator] starting the bot; it saves after every trade and will be killed with SIGKILL after about {kill_after} saves"
    )
    bot = subprocess.Popen(
        [sys.executable, "-m", "posstate.cli.demo", "bot", str(workdir), str(rng.randint(0, 2**31))],
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    assert bot.stdout is not None
    acks: dict[int, str] = {}
    last = 0

    def record(line: str) -> None:
        nonlocal last
        kind, *rest = line.split() or [""]
        if kind == "START":
            echo(f"[bot] started at generation {rest[0]} with {rest[1]} positions")
        elif kind == "ACK" and len(rest) == 2:
            last = int(rest[0])
            acks[last] = rest[1]
            if len(acks) % 20 == 0:
                echo(f"[bot] saved generation {last}")

    try:
        for line in bot.stdout:
            record(line)
            if len(acks) >= kill_after:
                # Let it run into its next save before the kill, so the kill may land mid-write.
                time.sleep(rng.random() * 0.002)
                break
    finally:
        bot.send_signal(signal.SIGKILL)
        bot.wait()
        # The bot may have acknowledged more saves than we had read: they are still in the pipe.
        for line in bot.stdout:
            if line.endswith("\n"):  # a line cut by the kill was never an acknowledgement
                record(line)
        bot.stdout.close()
    echo(f"[operator] SIGKILL sent to the bot (pid {bot.pid}); its last acknowledged save was generation {last}")
    echo("[operator] restarting: a new manager opens the same directory")
    with PositionStateManager(StateConfig.in_dir(workdir), key=key) as m:
        positions = m.load_positions()
        metadata = m.get_all_symbol_metadata()
        gen = m.generation
    echo(f"[bot] resumed from generation {gen}: {len(positions)} open positions, metadata for {len(metadata)} symbols")
    for (sym, side), p in sorted(positions.items()):
        meta = metadata.get(sym, {})
        echo(f"    {sym:<16} {side:<5} {p.contracts!s:>8} @ {p.entry_price!s:<10} entries={meta.get('entries_' + side, 0)}")
    if gen == last and state_digest(positions, metadata) == acks[last]:
        echo(f"[operator] OK: exactly the last acknowledged save (generation {gen}), byte for byte")
        return True
    if gen == last + 1:
        echo(f"[operator] OK: the save in flight at the kill (generation {gen}) had completed; nothing acknowledged was lost")
        return True
    echo(f"[operator] FAILED: expected generation {last} (or {last + 1} in flight), found {gen}")
    return False


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "bot":
        return _bot(argv[1], int(argv[2]) if len(argv) > 2 else 0)
    return 0 if run_demo() else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
