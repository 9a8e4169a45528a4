"""Shard map planning (pure): balanced layouts with the fewest moves, handover states."""

from __future__ import annotations

import pytest

from actors.runtime.shardmap import ShardMap, _parse


def apply(m: ShardMap, hosts: list[int]) -> tuple[ShardMap, int]:
    moves = m.plan(hosts)
    nxt = m.moved(moves, hosts)
    return nxt.settled(), len(moves)


@pytest.mark.parametrize("n_from,n_to", [(1, 2), (2, 3), (3, 8), (8, 3), (4, 1), (1, 64), (5, 7)])
def test_plan_balances_with_the_fewest_moves(n_from, n_to):
    m = ShardMap.static("k", n_from, 64)
    hosts = list(range(n_to))
    new, moved = apply(m, hosts)
    counts = new.counts()
    assert set(counts) == set(hosts) and sum(counts.values()) == 64
    assert max(counts.values()) - min(counts.values()) <= 1
    # the fewest moves: every host ends at its share, only the surplus moves
    keep = sum(min(m.counts().get(h, 0), counts[h]) for h in hosts)
    assert moved == 64 - keep
    assert new.version == 2 and not new.moving


def test_handover_states_active_held_refused():
    m = ShardMap.static("k", 2, 8)  # 0: 0,2,4,6  1: 1,3,5,7
    moves = m.plan([0, 1, 2])
    nxt = m.moved(moves, [0, 1, 2])
    moving = set(moves)
    assert nxt.moving == {s: f for s, (f, _t) in moves.items()}
    assert nxt.held_of(2) == moving and not nxt.active_of(2)  # the new host holds, handles nothing yet
    for h in (0, 1):  # old owners: what moved away is neither active nor held there
        assert not (nxt.active_of(h) & moving) and not nxt.held_of(h)
    done = nxt.settled()
    assert done.active_of(2) == moving and not done.held_of(2)


def test_removing_every_host_but_one_and_bad_plans():
    m = ShardMap.static("k", 4, 16)
    new, moved = apply(m, [3])
    assert set(new.owner) == {3} and moved == 12
    with pytest.raises(ValueError):
        m.plan([])
    with pytest.raises(ValueError):
        m.plan(list(range(17)))


def test_maps_of_another_cluster_or_shard_count_are_ignored():
    m = ShardMap.static("k", 2, 8).model_copy(update={"version": 3, "epoch": "session_a", "owner": [1] * 8})
    raw = m.model_dump_json()
    assert _parse("k", raw, 2, 8, "session_a").version == 3
    assert _parse("k", raw, 2, 8, "session_b").is_static  # another Ray cluster's map: not ours
    assert _parse("k", raw, 2, 16, "session_a").is_static  # num_shards changed: static layout
    assert _parse("k", b"{not json", 2, 8, "session_a").is_static
    assert _parse("k", None, 2, 8, "x").owner == [0, 1] * 4
