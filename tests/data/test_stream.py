from collections import Counter

import pytest

from finetune.data.pack import single_units
from finetune.data.stream import BatchStream


def units(n):
    return single_units([(list(range(i % 7 + 1)), [-100] * (i % 7 + 1)) for i in range(n)])


def rank_items(stream, step):
    return [j for chunk in stream.rank_indices(step) for j in chunk]


@pytest.mark.parametrize("world", [1, 2, 4])
def test_each_unit_once_per_epoch_across_ranks(world):
    us = units(24)
    streams = [BatchStream(us, 8, 2, world_size=world, rank=r, seed=3) for r in range(world)]
    for epoch in range(2):
        seen = Counter(j for step in range(epoch * 3, epoch * 3 + 3) for s in streams for j in rank_items(s, step))
        assert sorted(seen) == list(range(24)) and set(seen.values()) == {1}
    assert streams[0].epoch_at(3) == 1.0 and streams[0].epoch_at(1) == 1 / 3


@pytest.mark.parametrize("group", [False, True])
def test_same_units_per_step_for_world_1_and_2(group):
    us = units(30)  # not a multiple of the global batch: epochs straddle steps
    one = BatchStream(us, 6, 3, seed=1, group_by_length=group)
    two = [BatchStream(us, 6, 1, world_size=2, rank=r, seed=1, group_by_length=group) for r in range(2)]
    for step in range(12):
        assert sorted(rank_items(one, step)) == sorted(rank_items(two[0], step) + rank_items(two[1], step))
        assert len(two[0].rank_indices(step)) == 3 and len(one.rank_indices(step)) == 2


def test_resume_is_a_pure_function_of_step_and_group_by_length_sorts():
    us = units(20)
    a, b = BatchStream(us, 4, 2, seed=5, group_by_length=True), BatchStream(us, 4, 2, seed=5, group_by_length=True)
    for step in (7, 0, 3):
        assert a.global_indices(step) == b.global_indices(step)
        lens = [len(us[j]["input_ids"]) for j in a.global_indices(step)]
        assert lens == sorted(lens, reverse=True)
    batches = a.step_batches(2)
    assert len(batches) == 2 and batches[0]["input_ids"].shape[0] == 2
