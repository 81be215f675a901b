"""Global batches split over ranks: the union over ranks equals the 1-rank batch."""

from itertools import islice

from dsunlearn.engine.batches import global_batches, shard_for_rank


def test_ranks_partition_the_global_batch():
    items = list(range(37))
    one = list(islice(global_batches(items, 8, 0, 1, seed=3), 12))
    r0 = list(islice(global_batches(items, 8, 0, 2, seed=3), 12))
    r1 = list(islice(global_batches(items, 8, 1, 2, seed=3), 12))
    for full, a, b in zip(one, r0, r1, strict=True):
        assert a + b == full
        assert len(a) == len(b) == 4


def test_epochs_cover_everything():
    items = list(range(10))
    seen = [x for b in islice(global_batches(items, 5, 0, 1, seed=0), 2) for x in b]
    assert sorted(seen) == items


def test_shard_for_rank_same_number_of_batches():
    shards = [shard_for_rank(11, 3, r, 2) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 2
    flat = sorted(i for s in shards for b in s for i in b if i >= 0)
    assert flat == list(range(11))
