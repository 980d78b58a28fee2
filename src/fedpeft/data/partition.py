"""Split the training pool between clients with flwr-datasets partitioners.

Partitions are drawn by the pool's integer labels (:class:`fedpeft.data.sources.TextDataset`:
the classes, or the strata of a task type without classes); nothing here depends on what
the labels mean.

``iid`` and ``dirichlet`` use flwr-datasets' own :class:`IidPartitioner` and
:class:`DirichletPartitioner`. ``label-proportions`` (the FFA-LoRA paper's split: client
k draws fraction p[k][c] of its examples from class c) has no flwr-datasets equivalent, so
:class:`LabelProportionsPartitioner` implements it on flwr-datasets' ``Partitioner`` base
class, i.e. through the library's extension point, and works anywhere a partitioner does.
``by-column`` gives each distinct label (a stratum: an instruction set's source or task) to
its own clients, the "natural" groups of the data: with one client per group it is
flwr-datasets' :class:`NaturalIdPartitioner` (client i holds group i); with more clients,
:class:`ByColumnPartitioner` assigns clients to groups round-robin and splits each group
evenly between its clients.
"""

from __future__ import annotations

from collections.abc import Sequence

import datasets
import numpy as np
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, NaturalIdPartitioner, Partitioner

from fedpeft.config import ConfigError, DataConfig
from fedpeft.data.sources import TextDataset

__all__ = ["ByColumnPartitioner", "LabelProportionsPartitioner", "client_partition", "make_partitioner", "partition_sizes"]


class LabelProportionsPartitioner(Partitioner):
    """Equal-size partitions with a prescribed label mix per partition.

    Every partition gets ``size`` examples (the largest size the class counts allow, or
    ``max_size`` if smaller), of which ``round(size * proportions[k][c])`` come from class
    c. Examples are drawn without replacement, so partitions are disjoint.
    """

    def __init__(
        self,
        proportions: np.ndarray | Sequence[Sequence[float]],
        partition_by: str = "label",
        max_size: int = 0,
        seed: int = 42,
    ) -> None:
        super().__init__()
        self._props = np.asarray(proportions, dtype=np.float64)
        if self._props.ndim != 2 or np.any(self._props < 0):
            raise ValueError("proportions must be a 2-D array of non-negative fractions")
        self._partition_by = partition_by
        self._max_size = max_size
        self._seed = seed
        self._indices: list[np.ndarray] | None = None

    @property
    def num_partitions(self) -> int:
        return int(self._props.shape[0])

    def _build(self) -> list[np.ndarray]:
        labels = np.asarray(self.dataset[self._partition_by], dtype=np.int64)
        n_classes = self._props.shape[1]
        if labels.max(initial=0) >= n_classes:
            raise ConfigError(
                "data.label_proportions", n_classes, f"needs one fraction per class ({int(labels.max()) + 1} classes)"
            )
        rng = np.random.default_rng(self._seed)
        pools = [rng.permutation(np.flatnonzero(labels == c)) for c in range(n_classes)]
        demand = self._props.sum(axis=0)
        with np.errstate(divide="ignore"):
            caps = np.where(demand > 0, np.array([len(p) for p in pools]) / np.maximum(demand, 1e-12), np.inf)
        size = int(np.floor(caps.min()))
        if self._max_size:
            size = min(size, self._max_size)
        if size < 1:
            raise ConfigError("data.label_proportions", self._props.tolist(), "leaves a client with no data")
        cursor = [0] * n_classes
        out: list[np.ndarray] = []
        for row in self._props:
            counts = np.floor(row * size).astype(int)
            counts[int(np.argmax(row))] += size - counts.sum()  # rounding remainder
            parts = []
            for c, k in enumerate(counts):
                parts.append(pools[c][cursor[c] : cursor[c] + k])
                cursor[c] += k
            out.append(rng.permutation(np.concatenate(parts)))
        return out

    def load_partition(self, partition_id: int) -> datasets.Dataset:
        if self._indices is None:
            self._indices = self._build()
        return self.dataset.select(self._indices[partition_id].tolist())


class ByColumnPartitioner(Partitioner):
    """One or more clients per distinct value of ``partition_by`` (a natural group).

    Client i belongs to group ``i % groups`` (groups in sorted order), and a group's examples
    are shuffled by ``seed`` and split evenly between its clients, so partitions are disjoint
    and cover the data. With exactly one client per group this is flwr-datasets'
    :class:`NaturalIdPartitioner`; fewer clients than groups is a ConfigError (a group would
    belong to nobody).
    """

    def __init__(self, num_partitions: int, partition_by: str = "label", seed: int = 42) -> None:
        super().__init__()
        self._num_partitions = num_partitions
        self._partition_by = partition_by
        self._seed = seed
        self._indices: list[np.ndarray] | None = None
        self._natural: NaturalIdPartitioner | None = None

    @property
    def num_partitions(self) -> int:
        return self._num_partitions

    def _build(self) -> list[np.ndarray]:
        """Row positions of every partition (empty list: one client per group, NaturalIdPartitioner's)."""
        values = np.asarray(self.dataset[self._partition_by])
        groups = np.unique(values)
        n, g = self._num_partitions, len(groups)
        if n < g:
            raise ConfigError("train.clients", n, f"partition=by-column needs at least one client per group: the "
                                                  f"data has {g} distinct data.label_column values")
        if n == g:
            self._natural = NaturalIdPartitioner(partition_by=self._partition_by)
            self._natural.dataset = self.dataset
            return []
        rng = np.random.default_rng(self._seed)
        out: list[np.ndarray] = [np.zeros(0, dtype=np.int64)] * n
        for k, value in enumerate(groups):
            clients = list(range(k, n, g))
            shares = np.array_split(rng.permutation(np.flatnonzero(values == value)), len(clients))
            for client, share in zip(clients, shares, strict=True):
                out[client] = np.sort(share)
        return out

    def load_partition(self, partition_id: int) -> datasets.Dataset:
        if self._indices is None:
            self._indices = self._build()
        if self._natural is not None:
            return self._natural.load_partition(partition_id)
        return self.dataset.select(self._indices[partition_id].tolist())


def make_partitioner(cfg: DataConfig, num_clients: int, seed: int) -> Partitioner:
    """The flwr-datasets partitioner named by ``cfg.partition``."""
    if cfg.partition == "by-column":
        return ByColumnPartitioner(num_clients, partition_by="label", seed=seed)
    if cfg.partition == "iid":
        return IidPartitioner(num_partitions=num_clients)
    if cfg.partition == "dirichlet":
        return DirichletPartitioner(
            num_partitions=num_clients,
            partition_by="label",
            alpha=cfg.dirichlet_alpha,
            min_partition_size=2,
            self_balancing=True,
            seed=seed,
        )
    return LabelProportionsPartitioner(
        cfg.label_proportions, partition_by="label", max_size=cfg.examples_per_client, seed=seed
    )


# key -> (the pool itself, its partitions). Holding the pool keeps its id() from being reused by
# another pool while the entry lives (an id alone matched a freed pool's successor: stale indices).
_CACHE: dict[tuple[DataConfig, int, int, int], tuple[TextDataset, tuple[np.ndarray, ...]]] = {}


def _partition_indices(cfg: DataConfig, num_clients: int, seed: int, pool: TextDataset) -> tuple[np.ndarray, ...]:
    """Indices of every partition (computed once per process, configuration and pool).

    With ``examples_per_client`` a client holding more keeps a subsample drawn without
    replacement by ``numpy.random.default_rng(seed + 1)``, one draw per such client in client
    order (a client at or under the cap keeps its partition as it is)."""
    key = (cfg, num_clients, seed, id(pool))
    hit = _CACHE.get(key)
    if hit is not None and hit[0] is pool:
        return hit[1]
    ds = datasets.Dataset.from_dict({"label": pool.labels.tolist(), "idx": list(range(len(pool)))})
    partitioner = make_partitioner(cfg, num_clients, seed)
    partitioner.dataset = ds
    out = []
    rng = np.random.default_rng(seed + 1)
    for pid in range(num_clients):
        idx = np.asarray(partitioner.load_partition(pid)["idx"], dtype=np.int64)
        if cfg.examples_per_client and len(idx) > cfg.examples_per_client:
            idx = rng.choice(idx, size=cfg.examples_per_client, replace=False)
        out.append(idx)
    _CACHE.clear()  # one configuration at a time is enough; keeps memory flat
    _CACHE[key] = (pool, tuple(out))
    return _CACHE[key][1]


def client_partition(pool: TextDataset, cfg: DataConfig, num_clients: int, partition_id: int, seed: int) -> TextDataset:
    """The training examples of one client (deterministic for a given seed)."""
    if not 0 <= partition_id < num_clients:
        raise ConfigError("partition-id", partition_id, f"must be in [0, {num_clients})")
    indices = _partition_indices(cfg, num_clients, seed, pool)
    part = pool.subset(indices[partition_id])
    if len(part) < 2:
        raise ConfigError("data.partition", cfg.partition, f"client {partition_id} received {len(part)} examples; need >= 2")
    return part


def partition_sizes(pool: TextDataset, cfg: DataConfig, num_clients: int, seed: int) -> list[int]:
    """Number of examples each client holds."""
    return [len(ix) for ix in _partition_indices(cfg, num_clients, seed, pool)]
