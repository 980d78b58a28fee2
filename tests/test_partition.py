"""The partitioners' options, seeds, caps, cache and refusals, on small synthetic pools.

Each test pins something a disjointness or coverage check cannot see (the mutation run of
``data/partition.py`` found them unchecked): which seed a partition and its subsample come
from, that each option changes the partition the way it says, that the cache tells pools
apart, and that a refusal names the key, the value and the reason.
"""

from __future__ import annotations

import datasets
import numpy as np
import pytest

from fedpeft.config import ConfigError, DataConfig
from fedpeft.data import partition as part_mod
from fedpeft.data.partition import (
    ByColumnPartitioner,
    LabelProportionsPartitioner,
    _partition_indices,
    client_partition,
    partition_sizes,
)
from fedpeft.data.sources import TextDataset


def _pool(labels: list[int] | np.ndarray, classes: int = 2) -> TextDataset:
    labels = np.asarray(labels, dtype=np.int64)
    return TextDataset(tuple(f"t{i}" for i in range(len(labels))), labels, tuple("abcdefg"[:classes]))


def _fresh(cfg: DataConfig, clients: int, seed: int, pool: TextDataset) -> list[np.ndarray]:
    part_mod._CACHE.clear()
    return list(_partition_indices(cfg, clients, seed, pool))


def _parts(partitioner: LabelProportionsPartitioner | ByColumnPartitioner, labels: list[int]) -> list[np.ndarray]:
    partitioner.dataset = datasets.Dataset.from_dict({"label": labels, "idx": list(range(len(labels)))})
    return [np.asarray(partitioner.load_partition(p)["idx"]) for p in range(partitioner.num_partitions)]


def _mix(parts: list[np.ndarray], labels: list[int], classes: int = 2) -> list[list[int]]:
    return [np.bincount(np.asarray(labels)[p], minlength=classes).tolist() for p in parts]


def test_the_partition_cache_tells_pools_apart_and_computes_once() -> None:
    """Same configuration, another pool: that pool's partitions, also when the first pool was
    freed and the new one reuses its id() (an id-only key returned the freed pool's indices:
    197 of 200 pools made in a loop got stale partitions before the cache held the pool)."""
    cfg = DataConfig(partition="iid")
    big, small = _pool(np.arange(100) % 2), _pool(np.arange(30) % 2)
    assert partition_sizes(big, cfg, 2, 0) == [50, 50]
    assert partition_sizes(small, cfg, 2, 0) == [15, 15]
    first = _partition_indices(cfg, 2, 0, small)
    assert _partition_indices(cfg, 2, 0, small) is first  # computed once
    assert partition_sizes(small, cfg, 3, 0) == [10, 10, 10]  # same pool, another configuration
    assert partition_sizes(small, DataConfig(partition="iid", examples_per_client=5), 2, 0) == [5, 5]
    del big, small, first
    for n in range(20, 40):  # CPython hands a freed object's memory to the next one of its size
        pool = _pool(np.arange(n) % 2)
        sizes = partition_sizes(pool, cfg, 2, 0)
        assert sum(sizes) == n, (n, sizes)
        del pool


def test_the_subsample_comes_from_seed_plus_one_and_only_clients_over_the_cap_draw() -> None:
    """Client 0 holds exactly ``examples_per_client`` (kept as it is, no draw), client 1 more
    (subsampled by ``default_rng(seed + 1)``, the first draw of that generator)."""
    labels = [0] * 40 + [1] * 60
    pool = _pool(labels)
    full = _fresh(DataConfig(partition="by-column"), 2, 3, pool)
    capped = _fresh(DataConfig(partition="by-column", examples_per_client=40), 2, 3, pool)
    assert np.array_equal(capped[0], full[0])
    want = np.random.default_rng(4).choice(full[1], size=40, replace=False)
    assert np.array_equal(capped[1], want)
    assert capped[1].dtype == np.int64 and len(set(capped[1].tolist())) == 40


def test_a_client_with_two_examples_is_kept_and_one_with_fewer_is_refused() -> None:
    """by-column, 4 clients on 2 groups of 4 and 3 examples: shares 2, 2 (group 0) and 2, 1."""
    pool = _pool([0, 0, 0, 0, 1, 1, 1])
    cfg = DataConfig(partition="by-column")
    assert partition_sizes(pool, cfg, 4, 0) == [2, 2, 2, 1]
    assert len(client_partition(pool, cfg, 4, 0, 0)) == 2
    with pytest.raises(ConfigError) as info:
        client_partition(pool, cfg, 4, 3, 0)
    assert (info.value.key, info.value.value) == ("data.partition", "by-column")
    assert info.value.allowed == "client 3 received 1 examples; need >= 2"


def test_a_partition_id_outside_the_federation_names_the_id() -> None:
    pool = _pool(np.arange(30) % 2)
    for bad in (3, -1):
        with pytest.raises(ConfigError) as info:
            client_partition(pool, DataConfig(partition="iid"), 3, bad, 0)
        assert (info.value.key, info.value.value, info.value.allowed) == ("partition-id", bad, "must be in [0, 3)")


def test_dirichlet_keeps_a_client_at_the_two_example_floor_of_the_first_draw() -> None:
    """The partitioner's minimum is client_partition's floor (2), not flwr-datasets' default
    (10: 30 examples on 3 clients could never satisfy it). Seed 16 was picked because its first
    draw leaves one client with exactly 2 examples: a floor of 3 would redraw."""
    pool = _pool(np.arange(30) % 2)
    cfg = DataConfig(partition="dirichlet", dirichlet_alpha=0.5)
    sizes = partition_sizes(pool, cfg, 3, 16)
    assert min(sizes) == 2 and sum(sizes) == 30
    assert len(client_partition(pool, cfg, 3, sizes.index(2), 16)) == 2


@pytest.mark.parametrize("seed", range(5))
def test_dirichlet_is_self_balancing(seed: int) -> None:
    """flwr-datasets' self-balancing: a client already over the average size (N / clients)
    after the first class gets none of the next (without it, seeds 0-4 each break this)."""
    labels = np.arange(400) % 2
    parts = _fresh(DataConfig(partition="dirichlet", dirichlet_alpha=0.3), 4, seed, _pool(labels))
    mixes = [np.bincount(labels[p], minlength=2) for p in parts]
    over = [m for m in mixes if m[0] > 100]
    assert over  # the property is not vacuous for these seeds
    assert all(m[1] == 0 for m in over), mixes


@pytest.mark.parametrize(("partition", "clients"), [("label-proportions", 3), ("by-column", 4), ("dirichlet", 3)])
def test_the_seed_chooses_the_examples_of_every_seeded_partitioner(partition: str, clients: int) -> None:
    """Same seed, same partitions; another seed, other examples (the label mixes and the group
    of each by-column client stay: only which examples is seeded)."""
    pool = _pool(np.arange(300) % 2)
    cfg = DataConfig(partition=partition, label_proportions=((0.1, 0.9), (0.9, 0.1), (0.5, 0.5)))
    a, again, other = _fresh(cfg, clients, 5, pool), _fresh(cfg, clients, 5, pool), _fresh(cfg, clients, 6, pool)
    assert all(np.array_equal(x, y) for x, y in zip(a, again, strict=True))
    assert any(set(x.tolist()) != set(y.tolist()) for x, y in zip(a, other, strict=True))


def test_partitioners_default_to_the_label_column_and_seed_42() -> None:
    labels = (np.arange(60) % 2).tolist()
    props = [[0.5, 0.5], [0.2, 0.8]]
    for default, explicit, other in (
        (LabelProportionsPartitioner(props), LabelProportionsPartitioner(props, "label", 0, 42),
         LabelProportionsPartitioner(props, "label", 0, 7)),
        (ByColumnPartitioner(4), ByColumnPartitioner(4, "label", 42), ByColumnPartitioner(4, "label", 7)),
    ):
        got = _parts(default, labels)
        assert all(np.array_equal(x, y) for x, y in zip(got, _parts(explicit, labels), strict=True))
        assert any(not np.array_equal(x, y) for x, y in zip(got, _parts(other, labels), strict=True))


def test_label_mix_takes_the_largest_size_the_classes_allow_and_uses_up_the_scarce_one() -> None:
    """20 of class 0 and 100 of class 1, both clients 20 % / 80 %: class 0 allows 20 / 0.4 = 50
    examples per client, class 1 100 / 1.6 = 62, so 50 each: 10 + 40, every class-0 example used."""
    labels = [0] * 20 + [1] * 100
    parts = _parts(LabelProportionsPartitioner([[0.2, 0.8], [0.2, 0.8]]), labels)
    assert _mix(parts, labels) == [[10, 40], [10, 40]]
    assert sorted(i for p in parts for i in p.tolist() if labels[i] == 0) == list(range(20))
    assert len({i for p in parts for i in p.tolist()}) == 100


def test_max_size_caps_and_the_rounding_remainder_goes_to_the_row_majority() -> None:
    """10 per client at 25 % / 75 %: floor(2.5) + floor(7.5) = 9, the tenth from the larger
    class; through ``examples_per_client`` the partitioner caps (exact mixes), not a subsample."""
    labels = (np.arange(200) % 2).tolist()
    props = [[0.25, 0.75], [0.75, 0.25]]
    assert _mix(_parts(LabelProportionsPartitioner(props, max_size=10), labels), labels) == [[2, 8], [8, 2]]
    cfg = DataConfig(partition="label-proportions", label_proportions=((0.25, 0.75), (0.75, 0.25)),
                     examples_per_client=10)
    assert _mix(_fresh(cfg, 2, 0, _pool(labels)), labels) == [[2, 8], [8, 2]]


def test_label_mix_edge_cases_that_are_valid() -> None:
    """A class nobody asks for and no example has; zero fractions; one example per client;
    a single class."""
    labels = [0, 1, 0, 1]
    parts = _parts(LabelProportionsPartitioner([[1, 0, 0], [0, 1, 0]]), labels)
    assert _mix(parts, labels, 3) == [[2, 0, 0], [0, 2, 0]]
    assert _mix(_parts(LabelProportionsPartitioner([[1.0, 0.0], [0.0, 1.0]]), [0, 1]), [0, 1]) == [[1, 0], [0, 1]]
    assert _mix(_parts(LabelProportionsPartitioner([[1.0], [1.0]]), [0] * 6), [0] * 6, 1) == [[3], [3]]


@pytest.mark.parametrize("props", [[0.5, 0.5], [[0.5, 1.5], [-0.5, 0.5]], [[[0.5, 0.5]]]])
def test_proportions_that_are_not_a_table_of_fractions_are_refused(props: list) -> None:
    with pytest.raises(ValueError) as info:
        LabelProportionsPartitioner(props)
    assert str(info.value) == "proportions must be a 2-D array of non-negative fractions"


def test_label_mix_refusals_name_the_key_the_value_and_the_reason() -> None:
    with pytest.raises(ConfigError) as info:  # three classes, fractions for two
        _parts(LabelProportionsPartitioner([[0.5, 0.5], [0.5, 0.5]]), [0, 1, 2] * 10)
    assert (info.value.key, info.value.value) == ("data.label_proportions", 2)
    assert info.value.allowed == "needs one fraction per class (3 classes)"
    for labels in ([], [0, 0, 0]):  # no data; every client asks for the class nobody has
        props = [[0.0, 1.0], [0.0, 1.0]]
        with pytest.raises(ConfigError) as info:
            _parts(LabelProportionsPartitioner(props), labels)
        assert (info.value.key, info.value.value) == ("data.label_proportions", props)
        assert info.value.allowed == "leaves a client with no data"


def test_by_column_with_fewer_clients_than_groups_names_the_client_count() -> None:
    with pytest.raises(ConfigError) as info:
        _parts(ByColumnPartitioner(2), [0, 1, 2] * 4)
    assert (info.value.key, info.value.value) == ("train.clients", 2)
    assert "needs at least one client per group" in info.value.allowed and "3 distinct" in info.value.allowed
