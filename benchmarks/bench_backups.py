"""Benchmark (issue 14.2): the time a save's or compaction's caller spends on a timed backup, before and after.

Run from the repository root::

    python benchmarks/bench_backups.py                     # 100,000 positions, 24 backups already there
    python benchmarks/bench_backups.py --positions 10000   # smaller, faster

Before (the old path, run here with the same library calls it made): on the caller's thread, encode the state
again into a new backup, read it back and validate it, then plan retention by decrypting and validating EVERY
backup in the folder. After: the caller's hook (``posstate.backup.ops.after_save``) only notes the snapshot and
asks the background thread; the thread copies the verified state file and prunes with the verified-backup
cache. The table prints the caller's time before and after (median of --rounds), their ratio, and the
background thread's time with a cold cache (the first backup after an open: each existing backup is verified
once) and a warm one (steady state). Nothing here asserts: it prints a table.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from decimal import Decimal
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from posstate import Position, PositionStateManager, StateConfig
from posstate.backup import background as _background
from posstate.backup import backups as _backups
from posstate.backup import ops as _backup_ops
from posstate.backup import prune as _prune

KEY = bytes(range(32))


def _seed(m: PositionStateManager, count: int) -> None:
    """*count* backups, hourly in the past, each a copy of the state file."""
    bdir = m.config.backup_path
    bdir.mkdir(exist_ok=True)
    now = time.time()
    for i in range(count):
        stamp = time.strftime("%Y%m%d_%H%M%S", time.gmtime(now - 3600 * (i + 1)))
        shutil.copyfile(m.path, bdir / _backups.file_name(stamp))


def _before(m: PositionStateManager) -> float:
    """The old caller-side work of one timed backup: encode + write + verify, then a prune that fully checks all."""
    files = m._files
    cfg = m.config
    started = time.perf_counter()
    _backups.write_backup(
        m._state,
        backup_dir=cfg.backup_path,
        keyring=files.write_keyring,
        compression_level=cfg.compression_level if cfg.compression else None,
        options=files.read,
    )
    _prune.plan_prune(cfg, files.read, dry_run=True)  # cache=None: decrypts and validates every backup
    took = time.perf_counter() - started
    _trim(m, 24)
    return took


def _trim(m: PositionStateManager, keep: int) -> None:
    names = sorted(p for p in m.config.backup_path.iterdir() if p.name.startswith("positions_"))
    for p in names[: max(0, len(names) - keep)]:
        p.unlink()


def _after(m: PositionStateManager) -> tuple[float, float]:
    """The caller's time in the hook, and the background thread's time until it is idle again."""
    m._files.last_backup_at = float("-inf")
    started = time.perf_counter()
    _backup_ops.after_save(m._files, m._state)
    caller = time.perf_counter() - started
    assert m.wait_for_backups(600)
    background = time.perf_counter() - started
    return caller, background


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--positions", type=int, default=100_000)
    ap.add_argument("--backups", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=None)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-backups-", dir=args.dir))
    try:
        cfg = StateConfig.in_dir(root / "state", durability="snapshot", backup_interval=1e9, max_backups=args.backups)
        positions = [
            Position(symbol=f"S{i}/USDT", side="long", contracts=Decimal(i % 97 + 1), entry_price=Decimal("100.5"))
            for i in range(args.positions)
        ]
        with PositionStateManager(cfg, key=KEY) as m:
            m.save_positions(positions)
            assert m.wait_for_backups(600)
            _trim(m, 0)
            _seed(m, args.backups)
            size = m.path.stat().st_size
            before = [_before(m) for _ in range(args.rounds)]
        with PositionStateManager(cfg, key=KEY) as m:  # a fresh manager: an empty cache
            m.load_positions()
            cold_caller, cold_bg = _after(m)
            warm = [_after(m) for _ in range(args.rounds)]
            svc = _background.service(m._files)
            checks = svc.cache.full_checks
        b = statistics.median(before)
        a = statistics.median([c for c, _ in warm])
        print(f"{args.positions:,} positions, {args.backups} backups, state file {size / 1e3:,.0f} kB")
        print(f"{'':44}{'seconds':>12}")
        print(f"{'caller, before (encode + verify + full prune)':44}{b:12.3f}")
        print(f"{'caller, after (after_save hook), warm':44}{a:12.6f}")
        print(f"{'caller, after, first backup after open':44}{cold_caller:12.6f}")
        print(f"{'background, first after open (cold cache)':44}{cold_bg:12.3f}")
        print(f"{'background, steady state (warm cache)':44}{statistics.median([g for _, g in warm]):12.3f}")
        print(f"ratio caller before/after: {b / a:,.0f}x  (full checks run by the cache: {checks}, all in the first)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
