"""The block index alone (pure bookkeeping): residency, leaf-first LRU victims, leases, pins."""

from __future__ import annotations

import pytest

from kvstore.core.errors import InvalidArgumentError
from kvstore.core.keys import BlockHash
from kvstore.engine.index import BlockIndex

NS = b"n" * 16


def h(name: str) -> BlockHash:
    return BlockHash(name.encode().ljust(16, b"."))


def put_chain(index: BlockIndex, names: list[str], tier: str = "G2", nbytes: int = 10) -> None:
    parent = None
    for name in names:
        if index.begin_write(h(name), tier, namespace=NS, parent=parent, nbytes=nbytes):
            index.commit_write(h(name), tier)
        parent = h(name)
    index.touch([h(n) for n in names])


def test_residency_and_hottest() -> None:
    index = BlockIndex()
    put_chain(index, ["a"], "G3")
    assert index.hottest(h("a")) == "G3"
    put_chain(index, ["a"], "G2")
    assert index.hottest(h("a")) == "G2"
    assert index.tiers_of(h("a")) == ["G2", "G3"]
    assert index.bytes_in("G2") == 10
    assert index.remove(h("a"), "G2")
    assert not index.remove(h("a"), "G2")
    assert index.hottest(h("a")) == "G3"
    assert index.remove(h("a"), "G3")
    assert h("a") not in index
    assert index.bytes_in("G3") == 0


def test_block_being_written_is_not_readable_nor_evictable() -> None:
    index = BlockIndex()
    assert index.begin_write(h("a"), "G2", namespace=NS, parent=None, nbytes=10)
    assert not index.begin_write(h("a"), "G2", namespace=NS, parent=None, nbytes=10)
    assert index.hottest(h("a")) is None
    assert index.victims("G2", 100) == []
    assert index.bytes_in("G2") == 10
    index.abort_write(h("a"), "G2")
    assert h("a") not in index
    assert index.bytes_in("G2") == 0


def test_victims_are_leaves_first_in_lru_order() -> None:
    index = BlockIndex()
    put_chain(index, ["a0", "a1", "a2", "a3"])
    put_chain(index, ["a0", "a1", "b2"])  # shares a0, a1; more recent
    put_chain(index, ["c0", "c1"])  # most recent
    # All of chain a's tail goes first, from the leaf inwards; a1 is kept while b2 needs it.
    assert index.victims("G2", 20) == [h("a3"), h("a2")]
    assert index.victims("G2", 50) == [h("a3"), h("a2"), h("b2"), h("a1"), h("a0")]
    everything = index.victims("G2", 10_000)
    assert len(everything) == 7
    # Never a parent before any of its children.
    for i, key in enumerate(everything):
        parent = index.get(key)
        assert parent is not None
        if parent.parent is not None:
            assert parent.parent not in everything[:i]


def test_children_in_other_tiers_do_not_hold_a_parent() -> None:
    index = BlockIndex()
    put_chain(index, ["a0", "a1"], "G2")
    assert index.begin_write(h("a1"), "G3", namespace=NS, parent=h("a0"), nbytes=10)
    index.commit_write(h("a1"), "G3")
    index.remove(h("a1"), "G2")
    assert index.victims("G2", 10) == [h("a0")]


def test_leases_protect_and_expire() -> None:
    index = BlockIndex()
    put_chain(index, ["a0", "a1"])
    lease = index.add_lease([h("a1"), h("zz")], ttl_s=5, now=100.0)
    assert lease.keys == (h("a1"),)  # unknown keys are not leased
    assert index.is_protected(h("a1"))
    assert index.victims("G2", 100) == []  # a1 leased, a0 still has a child in G2
    assert index.expire(104.9) == (0, 0)
    assert index.expire(105.0) == (1, 0)
    assert not index.is_protected(h("a1"))
    assert index.victims("G2", 100) == [h("a1"), h("a0")]
    assert not index.release_lease(lease.lease_id)
    with pytest.raises(InvalidArgumentError):
        index.add_lease([h("a0")], ttl_s=0, now=0)


def test_release_before_expiry() -> None:
    index = BlockIndex()
    put_chain(index, ["a0"])
    lease = index.add_lease([h("a0")], ttl_s=5, now=0)
    assert index.release_lease(lease.lease_id)
    assert not index.is_protected(h("a0"))
    assert index.expire(10) == (0, 0)


def test_pins_with_and_without_ttl() -> None:
    index = BlockIndex()
    put_chain(index, ["a0"])
    put_chain(index, ["b0"])
    assert index.pin([h("a0"), h("missing")], ttl_s=None, now=0) == 1
    assert index.pin([h("b0")], ttl_s=10, now=0) == 1
    assert index.victims("G2", 100) == []
    assert index.expire(10) == (0, 1)
    assert index.victims("G2", 100) == [h("b0")]
    assert index.unpin([h("a0")]) == 1
    assert set(index.victims("G2", 100)) == {h("a0"), h("b0")}


def test_repinning_replaces_the_old_deadline() -> None:
    index = BlockIndex()
    put_chain(index, ["a0"])
    index.pin([h("a0")], ttl_s=1, now=0)
    index.pin([h("a0")], ttl_s=None, now=0)
    assert index.expire(5) == (0, 0)
    assert index.is_protected(h("a0"))


def test_touch_keeps_parents_more_recent() -> None:
    index = BlockIndex()
    put_chain(index, ["a0", "a1", "a2"])
    put_chain(index, ["x0"])
    index.touch([h("a0")])  # a shorter prompt hits the root only
    assert list(index.keys_in("G2")) == [h("a2"), h("a1"), h("x0"), h("a0")]


def test_touch_moves_a_block_in_every_tier_it_is_in() -> None:
    index = BlockIndex()
    put_chain(index, ["a0", "a1", "a2", "a3"], "G3")
    put_chain(index, ["a0", "a1"], "G2")  # a0, a1 in G2 and G3; a2, a3 in G3 only
    put_chain(index, ["x0"], "G2")
    put_chain(index, ["x0"], "G3")
    assert index.begin_write(h("w"), "G2", namespace=NS, parent=None, nbytes=10)
    # Missing keys are skipped, a block still being written moves in no tier (but is counted);
    # the rest move in each of their tiers, last first.
    index.touch([h("a0"), h("a1"), h("w"), h("gone"), h("a2"), h("a3")], hit=True)
    assert list(index.keys_in("G2")) == [h("x0"), h("a1"), h("a0")]
    assert list(index.keys_in("G3")) == [h("x0"), h("a3"), h("a2"), h("a1"), h("a0")]
    entries = [index.get(h(n)) for n in ("a0", "a1", "a2", "a3", "x0", "w")]
    assert [e.hits for e in entries if e is not None] == [1, 1, 1, 1, 0, 1]
    # The clock: a parent's last access is later than its child's, and later than any before.
    a0, a1, a2, a3, x0, w = (e.last_access for e in entries if e is not None)
    assert a0 > a1 > w > a2 > a3 > x0
    index.touch([h("a0"), h("a1"), h("a2"), h("a3")])  # hit=False counts nothing
    assert [e.hits for e in entries[:4] if e is not None] == [1, 1, 1, 1]
    assert list(index.keys_in("G3")) == [h("x0"), h("a3"), h("a2"), h("a1"), h("a0")]


def test_touch_of_a_repeated_key_moves_it_on_its_last_turn() -> None:
    index = BlockIndex()
    put_chain(index, ["a", "b", "c"])
    index.touch([h("a"), h("c"), h("a")])  # reversed: a, c, a
    assert list(index.keys_in("G2")) == [h("b"), h("c"), h("a")]
    a, c = index.get(h("a")), index.get(h("c"))
    assert a is not None
    assert c is not None
    assert a.last_access > c.last_access


def test_hottest_many_is_hottest_of_each() -> None:
    index = BlockIndex()
    put_chain(index, ["a", "b"], "G3")
    put_chain(index, ["a"], "G2")
    put_chain(index, ["c"], "G1")
    assert index.begin_write(h("w"), "G2", namespace=NS, parent=None, nbytes=10)
    keys = [h(n) for n in ("a", "b", "c", "w", "gone", "a")]
    assert index.hottest_many(keys) == ["G2", "G3", "G1", None, None, "G2"]
    assert index.hottest_many(keys) == [index.hottest(k) for k in keys]
    assert index.hottest_many([h("b"), h("b")]) == ["G3", "G3"]
    assert index.hottest_many([h("gone")]) == [None]
    assert index.hottest_many([]) == []
