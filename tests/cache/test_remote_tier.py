"""The remote tier without a server (fakeredis): records, round trips, bad values, outages.
The real redis-server is in tests/engine/test_remote_real.py."""

from __future__ import annotations

import fakeredis
import pytest
import redis

from kvserve.cache import record
from kvserve.cache.manager import KVCacheManager
from kvserve.cache.remote_tier import RemoteTier
from kvserve.cache.tiers import TierStore
from kvserve.engine.request import Request
from kvserve.sampling_params import SamplingParams

BS = 4


class Counting:
    """A client that counts round trips and can be switched off like a store going away."""

    def __init__(self, server: fakeredis.FakeServer) -> None:
        self.inner = fakeredis.FakeRedis(server=server)
        self.round_trips = 0
        self.down = False

    def _trip(self) -> None:
        if self.down:
            raise redis.ConnectionError("connection refused")
        self.round_trips += 1

    def mget(self, keys):
        self._trip()
        return self.inner.mget(keys)

    def pipeline(self, transaction=False):
        pipe = self.inner.pipeline(transaction=transaction)
        execute = pipe.execute

        def counted():
            self._trip()
            return execute()

        pipe.execute = counted
        return pipe


def tier(client, fingerprint="fp", kv_format="float32;v1") -> RemoteTier:
    return RemoteTier("redis://fake", fingerprint, lambda s: s.encode(), lambda b: b.decode(),
                      kv_format, client=client)


def req(tokens, rid="r", salt=None):
    return Request(rid, list(tokens), SamplingParams(max_tokens=4, cache_salt=salt))


def run_prompt(kv: KVCacheManager, request: Request) -> None:
    hit = kv.lookup(request)
    assert kv.allocate_slots(request, request.num_tokens - hit.num_tokens, hit)
    request.num_computed_tokens = request.num_tokens
    kv.commit(request)


@pytest.fixture
def server():
    return fakeredis.FakeServer()


def test_blocks_written_through_on_commit_are_found_by_another_replica(server):
    a_client, b_client = Counting(server), Counting(server)
    a = KVCacheManager(16, BS, tiers=TierStore(remote=tier(a_client)), fingerprint="fp")
    b = KVCacheManager(16, BS, tiers=TierStore(remote=tier(b_client)), fingerprint="fp")
    first = req(range(100, 117))  # 4 full blocks and one token
    run_prompt(a, first)
    saves = a.take_saves()
    assert [(s[0], s[3]) for s in saves] == [(0, False), (1, False), (2, False), (3, False)]
    for block_id, h, tokens, evicted in saves:  # the runner copies each block out
        a.store_block(h, tokens, f"kv-{block_id}", evicted)
    a.tiers.remote.flush()
    second = req(range(100, 117), rid="second")
    b_client.round_trips = 0
    hit = b.lookup(second)
    assert hit.tokens_by_tier() == {"remote": 16} and b_client.round_trips == 1  # one EXISTS pipe
    assert b.allocate_slots(second, 1, hit) and b_client.round_trips == 2  # one MGET
    assert [p for _, p in hit.loads] == ["kv-0", "kv-1", "kv-2", "kv-3"]
    assert b.tiers.remote.report()["blocks_read"] == 4


def test_a_block_already_in_the_store_is_neither_copied_nor_rewritten(server):
    client = Counting(server)
    remote = tier(client)
    remote.put(b"h" * 16, (1, 2), "first")
    remote.flush()
    assert not remote.wants(b"h" * 16)
    other = tier(Counting(server))  # another replica, which has not seen it yet
    other.put(b"h" * 16, (1, 2), "second")
    other.flush()
    assert other.get_many([(b"h" * 16, (1, 2))]) == ["first"]
    kv = KVCacheManager(16, BS, tiers=TierStore(remote=remote), fingerprint="fp")
    r = req(range(8))
    kv._hashes(r, 2)
    for h in r.block_hashes:
        remote.known[h] = None  # as if a lookup had found both blocks there
    run_prompt(kv, r)
    assert kv.take_saves() == []


@pytest.mark.parametrize("value", ["garbage", "other model", "other dtype", "other tokens"])
def test_bad_or_foreign_values_are_never_loaded(server, value):
    writer = {"other model": tier(Counting(server), fingerprint="fp2"),
              "other dtype": tier(Counting(server), kv_format="bfloat16;v1")}.get(
        value, tier(Counting(server)))
    h = b"k" * 16
    if value == "garbage":
        fakeredis.FakeRedis(server=server).set(RemoteTier.key(h), b"\x00" * 40)
    else:
        writer.put(h, (7, 8, 9) if value == "other tokens" else (1, 2), "payload")
        writer.flush()
    reader = tier(Counting(server))
    assert reader.get_many([(h, (1, 2))]) == [None]
    stats = reader.report()
    assert stats["blocks_read"] == 0
    assert stats["bad_records"] == (value in ("garbage", "other model"))
    assert stats["foreign_records"] == (value == "other dtype")


def test_a_store_that_goes_away_is_a_miss_and_comes_back(server, caplog, monkeypatch):
    client = Counting(server)
    remote = tier(client)
    remote.put(b"a" * 16, (1,), "x")
    remote.flush()
    client.down = True
    assert remote.contains_many([b"a" * 16, b"b" * 16]) == [False, False]
    assert not remote.report()["up"] and not remote.wants(b"c" * 16)
    assert remote.get_many([(b"a" * 16, (1,))]) == [None]  # down: not even tried
    assert sum("is down" in r.getMessage() for r in caplog.records) == 1
    client.down = False
    assert remote.contains_many([b"a" * 16]) == [False]  # still inside the backoff
    monkeypatch.setattr(remote, "_retry_at", 0.0)
    assert remote.contains_many([b"a" * 16]) == [True] and remote.report()["up"]


def test_a_write_that_fails_is_offered_again_later(server):
    client = Counting(server)
    remote = tier(client)
    client.down = True
    remote.put(b"a" * 16, (1,), "x")
    remote.flush()
    assert b"a" * 16 not in remote.known and remote.report()["errors"] == 1


def test_record_round_trip_and_checks():
    raw = record.pack(b"f" * 16, b"h" * 16, b"fmt", (1, 2, 3), b"payload")
    assert record.unpack(raw, b"f" * 16, b"h" * 16, b"fmt", 7) == ((1, 2, 3), b"payload")
    with pytest.raises(record.ForeignFormat):
        record.unpack(raw, b"f" * 16, b"h" * 16, b"other", 7)
    for bad in (raw[:-1], raw[:20], b"", raw[:-3] + b"xyz"):
        with pytest.raises(record.BadRecord):
            record.unpack(bad, b"f" * 16, b"h" * 16, b"fmt", 7)
    with pytest.raises(record.BadRecord):
        record.unpack(raw, b"f" * 16, b"h" * 16, b"fmt", 8)
