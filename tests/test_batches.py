"""Global batches split over ranks: the union over ranks equals the 1-rank batch; mixed image
and text data keeps every rank's modality count equal."""

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


def _kinds(batch, images):
    return sum(x in images for x in batch)


def test_balanced_batches_give_every_rank_the_same_number_of_images():
    """ZeRO-3: a rank with a text-only batch would skip the vision tower's collectives."""
    from dsunlearn.engine.batches import balanced_batches

    images = set(range(9))  # 9 image examples, 12 text-only ones (SIU's mix for one person)
    items = list(range(21))
    has_image = images.__contains__
    for world, global_batch in ((2, 4), (2, 2), (4, 8), (1, 4)):
        streams = [
            list(islice(balanced_batches(items, global_batch, r, world, 0, has_image), 30))
            for r in range(world)
        ]
        for step in zip(*streams, strict=True):
            counts = {_kinds(b, images) for b in step}
            assert len(counts) == 1, (world, global_batch, step)  # same on every rank
            assert all(len(b) == global_batch // world for b in step)
            if global_batch // world >= 2:
                assert counts.pop() >= 1  # and never zero when a rank has room for both
        seen = {x for s in streams for b in s for x in b}
        assert seen == set(items)  # nothing starved


def test_balanced_batches_single_kind_is_global_batches():
    from dsunlearn.engine.batches import balanced_batches

    items = list(range(13))
    a = list(islice(balanced_batches(items, 4, 1, 2, 5, lambda x: True), 6))
    b = list(islice(global_batches(items, 4, 1, 2, 5), 6))
    assert a == b
