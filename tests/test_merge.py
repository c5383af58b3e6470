"""merge_states: per-entry revisions, tombstones, ties to current; hypothesis properties over real histories."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from posstate import MergeResult, Position, PositionStateManager, StateConfig
from posstate.model.document import StateData
from posstate.model.merge import drop_old_tombstones, merge_states

KEYS = [("BTC/USDT", "long"), ("BTC/USDT", "short"), ("ETH/USDT", "long")]
SYMBOLS = ["BTC/USDT", "ETH/USDT"]

Op = tuple[str, int, int]  # (kind, key index, value)

ops_strategy = st.lists(
    st.tuples(st.sampled_from(["set", "delete", "meta", "unmeta"]), st.integers(0, 2), st.integers(1, 5)), min_size=1, max_size=25
)


def position(key: tuple[str, str], contracts: int) -> Position:
    return Position(symbol=key[0], side=key[1], contracts=contracts, entry_price="10")  # type: ignore[arg-type]


def simulate(ops: list[Op]) -> list[StateData]:
    """The state after each save of a history where every op is one save (rev = generation), as the manager does."""
    state = StateData(written_at="2026-01-01T00:00:00.000Z")
    out: list[StateData] = []
    for gen, (kind, i, value) in enumerate(ops, 1):
        state = state.copy()
        state.generation = gen
        key = KEYS[i]
        sym = SYMBOLS[i % 2]
        if kind == "set":
            state.positions[key] = position(key, value)  # type: ignore[index]
            state.position_revs[key] = gen  # type: ignore[index]
            state.position_tombstones.pop(key, None)  # type: ignore[arg-type]
        elif kind == "delete" and key in state.positions:
            del state.positions[key]  # type: ignore[arg-type]
            del state.position_revs[key]  # type: ignore[arg-type]
            state.position_tombstones[key] = gen  # type: ignore[index]
        elif kind == "meta":
            state.metadata[sym] = {"n": value}
            state.metadata_revs[sym] = gen
            state.metadata_tombstones.pop(sym, None)
        elif kind == "unmeta" and sym in state.metadata:
            del state.metadata[sym]
            del state.metadata_revs[sym]
            state.metadata_tombstones[sym] = gen
        out.append(state)
    return out


@settings(max_examples=60, deadline=None)
@given(ops=ops_strategy)
def test_merging_a_state_with_itself_changes_nothing(ops: list[Op]) -> None:
    """merge(s, s) == s, and every decision says 'same in both'."""
    s = simulate(ops)[-1]
    result = merge_states(s, s.copy())
    assert result.state == s
    assert all(d.source == "both" for d in result.decisions)


@settings(max_examples=60, deadline=None)
@given(ops=ops_strategy, data=st.data())
def test_merge_is_idempotent_and_never_resurrects(ops: list[Op], data: st.DataObject) -> None:
    """With a backup from earlier in the same history: merging gives the newer state; again changes nothing."""
    history = simulate(ops)
    backup = history[data.draw(st.integers(0, len(history) - 1))]
    current = history[-1]
    merged = merge_states(current, backup).state
    assert merge_states(merged, backup).state == merged
    assert merged.positions == current.positions and merged.metadata == current.metadata
    for key in current.position_tombstones:
        assert key not in merged.positions  # a closed position never comes back
    # the order of the arguments does not matter for content: the higher revision wins either way
    swapped = merge_states(backup, current).state
    assert swapped.positions == current.positions and swapped.position_tombstones == merged.position_tombstones


@settings(max_examples=40, deadline=None)
@given(a=ops_strategy, b=ops_strategy)
def test_merge_is_deterministic_for_unrelated_states(a: list[Op], b: list[Op]) -> None:
    """Two runs over the same inputs give the same state and decisions; merging the result again is stable."""
    x, y = simulate(a)[-1], simulate(b)[-1]
    first, second = merge_states(x, y), merge_states(x, y)
    assert first == second
    assert merge_states(first.state, y).state == first.state


def test_tie_goes_to_current_and_decisions_explain() -> None:
    """Same revision, different content: current wins; a newer backup tombstone beats an older live entry."""
    key = KEYS[0]
    cur = StateData(generation=5, positions={key: position(key, 1)}, position_revs={key: 3})  # type: ignore[dict-item]
    bak = StateData(generation=5, positions={key: position(key, 2)}, position_revs={key: 3})  # type: ignore[dict-item]
    r = merge_states(cur, bak)
    assert r.state.positions[key].contracts == 1  # type: ignore[index]
    assert "tie goes to current" in r.decisions[0].reason
    closed = StateData(generation=6, position_tombstones={key: 4})  # type: ignore[dict-item]
    r2 = merge_states(cur, closed)
    assert key not in r2.state.positions and r2.decisions[0].source == "backup" and r2.decisions[0].outcome == "deleted"
    assert r2.changed == r2.decisions


def test_drop_old_tombstones_respects_the_floor() -> None:
    """Tombstones at or below the oldest backup's generation go; newer ones and all (floor None) stay."""
    s = StateData(position_tombstones={KEYS[0]: 2, KEYS[1]: 5}, metadata_tombstones={"X": 1})  # type: ignore[dict-item]
    assert drop_old_tombstones(s, floor=None) == 0
    assert drop_old_tombstones(s, floor=2) == 2
    assert s.position_tombstones == {KEYS[1]: 5} and s.metadata_tombstones == {}


def test_manager_merge_states_with_backup_ids(tmp_path: Path) -> None:
    """PositionStateManager.merge_states accepts 'current' and a backup id, and writes nothing."""
    cfg = StateConfig.in_dir(tmp_path / "state", backup_interval=0.0)
    with PositionStateManager(cfg, key=bytes(range(32))) as m:
        m.save_positions([position(KEYS[0], 1), position(KEYS[2], 1)])
        assert m.wait_for_backups(30)  # timed backups run in the background (issue 14.2)
        m.save_positions([position(KEYS[0], 2)])
        assert m.wait_for_backups(30)
        oldest = m.list_backups()[-1].id
        before = cfg.state_path.read_bytes()
        result = m.merge_states("current", oldest)
        assert isinstance(result, MergeResult)
        assert set(result.state.positions) == {KEYS[0]} and KEYS[2] in result.state.position_tombstones
        assert cfg.state_path.read_bytes() == before
