"""``posstate demo``: the whole story in under a minute (issue 15.12), played by a real bot process and an
operator (this process).

1. **Crash.** A bot (``python -m posstate.cli.demo bot STATE SEED``) trades five perpetuals at realistic
   prices, one journaled transaction per trade (position and symbol metadata together), and prints an
   acknowledgement after each change returns; every 25 trades it takes a backup. It is killed with SIGKILL
   at a random moment (possibly mid-write); a new manager on the same directory must hold exactly the last
   acknowledged trade (or the one in flight, which then completed).
2. **Damage.** The restarted bot trades on and stops; then bytes in the middle of its state file are
   overwritten, as a bad disk or a careless ``dd`` would. The next start recovers by itself from the newest
   trustworthy copy and says what it used and what it set aside.
3. **The operator's view.** ``posstate validate``, ``posstate backups list``, and a restore of an older
   backup with its diff (what the restore changes), each run as a real command.

It leaves the directory and a key file behind and prints the commands to explore them.
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
from typing import Any

from posstate.core.config import StateConfig
from posstate.core.errors import PosStateError
from posstate.manager.manager import PositionStateManager
from posstate.model.position import Position, PositionKey, Side
from posstate.storage import atomic as _atomic
from posstate.storage import fileops as fs
from posstate.storage.crypto import encode_key_text, generate_key, read_key_file

SIDES: tuple[Side, Side] = ("long", "short")
#: symbol -> (a realistic price, its tick, a typical order size in contracts, the size step)
MARKETS: dict[str, tuple[Decimal, Decimal, Decimal, Decimal]] = {
    "BTC/USDT:USDT": (Decimal("97250.0"), Decimal("0.1"), Decimal("0.050"), Decimal("0.001")),
    "ETH/USDT:USDT": (Decimal("3412.50"), Decimal("0.01"), Decimal("1.50"), Decimal("0.01")),
    "SOL/USDT:USDT": (Decimal("181.420"), Decimal("0.001"), Decimal("25.0"), Decimal("0.1")),
    "XRP/USDT:USDT": (Decimal("2.2150"), Decimal("0.0001"), Decimal("2500"), Decimal("1")),
    "DOGE/USDT:USDT": (Decimal("0.32150"), Decimal("0.00001"), Decimal("15000"), Decimal("1")),
}
SYMBOLS = tuple(MARKETS)
BACKUP_EVERY = 25  # trades between the bot's backups (a real bot's are timed; this keeps the demo short)
MORE_TRADES = 30  # trades after the restart, before the damage


def state_digest(positions: dict[PositionKey, Position], metadata: dict[str, dict[str, object]]) -> str:
    """A digest of positions and metadata, the same in the bot and in the checker."""
    h = hashlib.sha256()
    for key in sorted(positions):
        h.update(repr(sorted(positions[key].to_dict().items())).encode())
    for sym in sorted(metadata):
        h.update(sym.encode() + repr(sorted(metadata[sym].items())).encode())
    return h.hexdigest()[:16]


def last_trade(metadata: dict[str, dict[str, Any]]) -> int:
    """The number of the last trade the state holds (each trade records it in its symbol's metadata)."""
    return max((int(d.get("last_trade", 0)) for d in metadata.values()), default=0)


def _trade(m: PositionStateManager, rng: random.Random, prices: dict[str, Decimal], n: int) -> None:
    """One trade: open, add to or close a position, and its symbol's metadata, in one journaled transaction."""
    sym = rng.choice(SYMBOLS)
    side: Side = rng.choice(SIDES)
    _, tick, size, step = MARKETS[sym]
    prices[sym] = (prices[sym] * Decimal(rng.randint(9985, 10015)) / 10000).quantize(tick)
    price = prices[sym]
    current = m.get_position(sym, side)
    meta = dict(m.get_symbol_metadata(sym) or {"entries_long": 0, "entries_short": 0})
    meta.update(last_trade=n, last_price=str(price))
    with m.transaction():
        if current is not None and rng.random() < 0.3:
            m.delete_position(sym, side)
            meta["closes"] = int(meta.get("closes", 0)) + 1
        else:
            add = (size * Decimal(rng.randint(20, 200)) / 100).quantize(step)
            held = current.contracts if current else Decimal(0)
            entry = ((current.entry_price * held + price * add) / (held + add)).quantize(tick) if current else price
            m.set_position(
                Position(
                    symbol=sym,
                    side=side,
                    contracts=held + add,
                    entry_price=entry,
                    mark_price=price,
                    leverage=Decimal(5),
                    timestamp=int(time.time() * 1000),
                )
            )
            meta[f"entries_{side}"] = int(meta.get(f"entries_{side}", 0)) + 1
        m.set_symbol_metadata(sym, meta)


def _bot(state_dir: str, seed: int, trades: int | None = None) -> int:
    """The bot: trade on a random walk, acknowledge each change once it returned, back up now and then.
    The key comes from POSSTATE_KEY_FILE, as a deployed bot's would. *trades*: stop after that many."""
    rng = random.Random(seed)
    out = sys.stdout
    cfg = StateConfig.in_dir(state_dir, backup_interval=1e9)
    with PositionStateManager(cfg) as m:
        m.load_positions()
        n = last_trade(m.get_all_symbol_metadata())
        out.write(f"START {n} {len(m.get_positions())}\n")
        out.flush()
        prices = {s: MARKETS[s][0] for s in SYMBOLS}
        for sym, data in m.get_all_symbol_metadata().items():
            if sym in prices and "last_price" in data:
                prices[sym] = Decimal(str(data["last_price"]))
        done = 0
        while trades is None or done < trades:
            n += 1
            _trade(m, rng, prices, n)
            out.write(f"ACK {n} {state_digest(m.get_positions(), m.get_all_symbol_metadata())}\n")
            out.flush()
            done += 1
            if n % BACKUP_EVERY == 0:
                info = m.create_backup()
                out.write(f"BACKUP {info.id} {n}\n")
                out.flush()
    return 0


class _BotStopped(Exception):
    """The bot process stopped on an error (it printed ``ERROR <message>``) or before its first trade."""


class _Demo:
    """The operator's side: start, kill and restart the bot, damage its file, run the commands."""

    def __init__(self, workdir: Path, rng: random.Random, echo: Callable[[str], None]) -> None:
        self.workdir = workdir
        self.state = workdir / "state"
        self.key_file = workdir / "demo.key"
        self.rng = rng
        self.echo = echo
        self.acks: dict[int, str] = {}
        self.backups: list[tuple[str, int]] = []

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("POSSTATE_") and k != "NO_COLOR"}
        env.update(POSSTATE_DIR=str(self.state), POSSTATE_KEY_FILE=str(self.key_file), NO_COLOR="1")
        return env

    def bot(self, *extra: str) -> subprocess.Popen[str]:
        args = [sys.executable, "-m", "posstate.cli.demo", "bot", str(self.state), str(self.rng.randint(0, 2**31)), *extra]
        return subprocess.Popen(args, stdout=subprocess.PIPE, env=self.env(), text=True)

    def record(self, line: str) -> None:
        kind, *rest = line.split() or [""]
        if kind == "START":
            self.echo(f"[bot] started: {rest[1]} open positions, last trade #{rest[0]}")
        elif kind == "ACK" and len(rest) == 2:
            self.acks[int(rest[0])] = rest[1]
            if int(rest[0]) % 20 == 0:
                self.echo(f"[bot] trade #{rest[0]} acknowledged (journaled and fsynced)")
        elif kind == "ERROR":
            self.echo(f"[bot] stopped: {' '.join(rest)}")
            raise _BotStopped(" ".join(rest))
        elif kind == "BACKUP" and len(rest) == 2:
            self.backups.append((rest[0], int(rest[1])))
            self.echo(f"[bot] backup {rest[0]} taken after trade #{rest[1]}")

    def load(self) -> tuple[dict[PositionKey, Position], dict[str, dict[str, Any]], Any]:
        with PositionStateManager(StateConfig.in_dir(self.state, backup_interval=1e9), key=read_key_file(self.key_file)) as m:
            positions = m.load_positions()
            return dict(positions), m.get_all_symbol_metadata(), m.last_recovery

    def command(self, *args: str) -> None:
        """Run ``posstate ARGS`` as the operator would, and show it with its output."""
        self.echo(f"$ posstate {' '.join(args)}")
        r = subprocess.run(
            [sys.executable, "-m", "posstate", *args], env=self.env(), capture_output=True, text=True, timeout=120, check=False
        )
        for line in (r.stdout + r.stderr).splitlines():
            self.echo(f"    {line}")

    def positions_table(self, positions: dict[PositionKey, Position]) -> None:
        for (sym, side), p in sorted(positions.items()):
            self.echo(f"    {sym:<15} {side:<5} {p.contracts!s:>10} @ {p.entry_price!s:<10}")


def _act_crash(d: _Demo, kill_after: int) -> bool:
    d.echo(f"\n== 1. SIGKILL: the bot is killed mid-run after about {kill_after} trades, then restarted")
    bot = d.bot()
    assert bot.stdout is not None
    try:
        for line in bot.stdout:
            d.record(line)
            if len(d.acks) >= kill_after:
                time.sleep(d.rng.random() * 0.002)  # let it run into its next change, so the kill may land mid-write
                break
    finally:
        bot.send_signal(signal.SIGKILL)
        bot.wait()
        for line in bot.stdout:  # acknowledged before the kill but not yet read
            if line.endswith("\n"):
                d.record(line)
        bot.stdout.close()
    if not d.acks:
        raise _BotStopped(f"the bot stopped before its first trade (exit status {bot.returncode})")
    last = max(d.acks)
    d.echo(f"[operator] kill -9 {bot.pid}; the last trade the bot acknowledged was #{last}")
    positions, metadata, _ = d.load()
    held = last_trade(metadata)
    d.echo(f"[operator] restarted: {len(positions)} open positions, last trade #{held}")
    d.positions_table(positions)
    if held == last and state_digest(positions, metadata) == d.acks[last]:
        d.echo(f"[operator] OK: exactly the state after trade #{last}, position for position")
        return True
    if held == last + 1:
        d.echo(f"[operator] OK: trade #{held} was in flight at the kill and had completed; nothing acknowledged was lost")
        return True
    d.echo(f"[operator] FAILED: expected the state after trade #{last} (or #{last + 1} in flight), found #{held}")
    return False


def _act_damage(d: _Demo) -> bool:
    d.echo(f"\n== 2. Damage: the bot trades on ({MORE_TRADES} trades), stops, and its state file is overwritten in the middle")
    bot = d.bot(str(MORE_TRADES))
    out, _ = bot.communicate(timeout=120)
    for line in out.splitlines(keepends=True):
        d.record(line)
    before, before_meta, _ = d.load()
    path = d.state / "positions.json"
    data = bytearray(fs.read_file(path))
    mid = len(data) // 2
    data[mid : mid + 16] = b"\x00" * 16
    _atomic.write_file(path, bytes(data))
    d.echo(f"[operator] 16 bytes at offset {mid} of {path.name} overwritten with zeros")
    positions, metadata, report = d.load()
    if report is None:
        d.echo("[operator] FAILED: the damaged file loaded without a recovery")
        return False
    d.echo(f"[bot] started: the state file was damaged ({report.reason})")
    d.echo(
        f"[bot] recovered automatically from {report.source} (generation {report.generation}), "
        f"written as generation {report.new_generation}"
    )
    if report.quarantined is not None:
        d.echo(f"[bot] the damaged file was kept for inspection: {report.quarantined}")
    if report.journal:
        d.echo(f"[bot] journal: {report.journal}")
    same = state_digest(positions, metadata) == state_digest(before, before_meta)
    lost = last_trade(before_meta) - last_trade(metadata)
    if same:
        d.echo(
            f"[operator] OK: nothing lost; {len(positions)} positions, last trade #{last_trade(metadata)}, as before the damage"
        )
    else:
        d.echo(f"[operator] OK: recovered the newest trustworthy copy; the last {lost} trade(s) before the damage are not in it")
    return True


def _act_operator(d: _Demo) -> None:
    d.echo("\n== 3. The operator's view")
    d.command("validate")
    d.command("backups", "list")
    if d.backups:
        older, trade = d.backups[-2] if len(d.backups) > 1 else d.backups[-1]
        d.echo(f"[operator] roll back to backup {older} (after trade #{trade}): first what it changes, then the restore")
        d.command("diff", str(d.state / "positions.json"), older)
        d.command("backups", "restore", older, "--yes")
        d.command("show")


def run_demo(
    *, state_dir: str | None = None, saves: int | None = None, seed: int | None = None, echo: Callable[[str], None] = print
) -> bool:
    """Run the demo; True when every check held. *saves*: trades before the kill (default random 40-120)."""
    rng = random.Random(seed)
    workdir = Path(state_dir) if state_dir else Path(tempfile.mkdtemp(prefix="posstate-demo-"))
    fs.ensure_dir(workdir)
    d = _Demo(workdir, rng, echo)
    if not fs.exists(d.key_file):  # a directory from an earlier run keeps its key
        _atomic.write_new_file(d.key_file, (encode_key_text(generate_key()) + "\n").encode("ascii"))
    echo(f"posstate demo in {workdir}: state in state/, its AES-256-GCM key in demo.key")
    echo("[operator] the bot trades 5 perpetuals, one journaled transaction per trade, and acknowledges each")
    echo("           change once it returned (on disk, fsynced); every 25 trades it takes a backup")
    try:
        ok = _act_crash(d, saves if saves is not None else rng.randint(40, 120))
        ok = _act_damage(d) and ok
    except (_BotStopped, PosStateError) as exc:
        echo(f"[operator] FAILED: {' '.join(str(exc).split())}")
        return False
    _act_operator(d)
    echo("\n== Explore it yourself")
    reach = path_hint()
    if reach:
        echo(f"    {reach}")
    echo(f"    export POSSTATE_DIR={d.state} POSSTATE_KEY_FILE={d.key_file}")
    for line in (
        "posstate show                 # the positions a restarted bot loads",
        "posstate history              # changes journaled since the last snapshot",
        "posstate backups list         # every backup, newest first",
        "posstate validate --json      # every check, as monitoring reads it",
        f"ls {d.state / 'quarantine'}   # the damaged file, set aside, never deleted",
    ):
        echo(f"    {line}")
    return ok


def path_hint() -> str | None:
    """``export PATH=...`` when the ``posstate`` beside this interpreter is not the one the caller's shell would
    run (after ``bash scripts/demo.sh`` from a fresh clone it is in ``.venv/bin``, which is not on the caller's
    PATH), so the commands printed to explore work as printed; None when it is. The caller's PATH is
    ``POSSTATE_DEMO_CALLER_PATH`` when set (scripts/demo.sh saves it before putting ``.venv/bin`` on its own
    PATH), else ``PATH``."""
    import shutil

    here = Path(sys.executable).parent / "posstate"
    if not fs.exists(here):
        return None
    found = shutil.which("posstate", path=os.environ.get("POSSTATE_DEMO_CALLER_PATH") or os.environ.get("PATH"))
    if found is not None and Path(found).resolve() == here.resolve():
        return None
    return f'export PATH="{here.parent}:$PATH"'


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "bot":
        try:
            return _bot(argv[1], int(argv[2]) if len(argv) > 2 else 0, int(argv[3]) if len(argv) > 3 else None)
        except PosStateError as exc:  # one line for the operator's side to show, not a traceback
            sys.stdout.write("ERROR " + " ".join(str(exc).split()) + "\n")
            return 1
    return 0 if run_demo() else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
