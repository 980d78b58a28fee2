"""The fedpeft protocol: every key of what ServerApp and ClientApp exchange, and its codecs.

Ground floor (imports nothing of fedpeft): the server, the strategies, the client and the
simulator all spell a message the same way by importing it from here, so the protocol has
one owner and a key cannot drift between a writer and its reader.

**TRAIN message** (server -> client), a ``RecordDict``:

* ``ARRAYS``: the global trainable state (:func:`state_to_arrayrecord`);
* ``CONFIG``: the round's configuration (:class:`RoundConfig`): ``SERVER_ROUND``, the
  resolved run configuration ``CONFIG_TOML`` and its ``CONFIG_HASH``, the hash of the shared
  frozen tensors ``FROZEN_HASH`` (FFA-LoRA's A), the retry ``ATTEMPT``, plus the server's
  extras ``LEDGER_DIR`` (simulation) and ``LABEL_NAMES`` (the label vocabulary, JSON).
  Simulation only: ``HETERO_PLAN``, the heterogeneous-device plan (:func:`encode_hetero_plan`).

**Reply** (client -> server), one of

* a release: ``ARRAYS`` (the DP-trained state), ``METRICS`` (:func:`reply_metrics`: under DP
  only :data:`DP_METRICS`, values public by design or accounted) and ``INFO`` (``CLIENT``,
  ``FROZEN_HASH``, ``ACCOUNTANT``, ``PROFILE`` in device emulation);
* a ``STATUS`` record (:func:`refusal`, :func:`timed_out`): ``REFUSED`` (with ``REASON``, ``CLIENT`` and the
  ``EPSILON`` already spent), ``HETERO_SKIP`` (an emulated device sits the round out) or
  ``TIMED_OUT`` (an emulated lost reply; it trained and spent ``EPSILON``).

**Node config** (the node operator's own ``--node-config``, never the server's): ``DATA_PATH``,
``TEXT_COLUMN``, ``LABEL_COLUMN``, ``LEDGER_DIR``, ``CLIENT_ID``, ``TASK`` and the node's limits
``MAX_EPSILON``, ``MAX_DELTA``, ``MIN_NOISE_MULTIPLIER``; the simulation engine sets
``PARTITION_ID``.

**Device directive** (simulation only, :class:`DeviceDirective`): the emulated device a
simulated client trains as. The simulator's ClientApp mod (``fedpeft.sim.mods``) reads this
client's entry of ``HETERO_PLAN`` and hands it to the client in ``Context.state`` under
``DEVICE_STATE`` for the one call; a server cannot write a node's ``Context``, so nothing it
sends can set a directive on a client that runs without the simulator's mods.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

__all__ = [
    "ACCOUNTANT", "ARRAYS", "ATTEMPT", "BYTES_UP", "CLIENT", "CLIENT_ID", "CONFIG", "CONFIG_HASH", "CONFIG_TOML",
    "DATA_PATH", "DELTA", "DEVICE_STATE", "DP_METRICS", "DeviceDirective", "EPSILON", "FROZEN_HASH", "HETERO_PLAN",
    "HETERO_SKIP", "INFO", "LABEL_COLUMN", "LABEL_NAMES", "LEDGER_DIR", "MAX_DELTA", "MAX_EPSILON", "METRICS",
    "MIN_NOISE_MULTIPLIER", "NOISE_MULTIPLIER", "NUM_EXAMPLES", "PARTITION_ID", "PERSONAL_ACCURACY",
    "PERSONAL_EXAMPLES", "PERSONAL_METRICS", "PROFILE", "ProtocolError", "REASON",
    "REFUSED", "RoundConfig", "SAMPLES_SEEN", "SAMPLE_RATE", "SECONDS", "SERVER_ROUND", "SIMULATION_ENTRIES", "STATUS",
    "STEPS", "TASK", "TEXT_COLUMN", "TIMED_OUT", "TRAIN_LOSS", "TRAIN_LOSS_FIRST", "TRAIN_LOSS_LAST",
    "WARM_IDLE_S", "WARM_WORKER",
    "arrayrecord_to_state", "check_dp_metrics", "decode_hetero_plan", "diagnostics", "encode_hetero_plan",
    "record_nbytes", "refusal", "reply_metrics", "round_config_of", "state_nbytes", "state_to_arrayrecord", "status_reply", "timed_out", "train_reply",
]

# ---- entries of a message's RecordDict ----------------------------------------------------
ARRAYS, CONFIG, METRICS, INFO, STATUS = "arrays", "config", "metrics", "info", "status"

# ---- the round's ConfigRecord (server -> client) ------------------------------------------
SERVER_ROUND = "server-round"
CONFIG_TOML = "fedpeft-config"
CONFIG_HASH = "config-hash"
FROZEN_HASH = "frozen-hash"  # also in a reply's INFO: the client's own hash of its frozen tensors
ATTEMPT = "attempt"
LEDGER_DIR = "ledger-dir"  # also a node-config key; the node's own wins (fedpeft.client.runtime)
LABEL_NAMES = "label-names"
HETERO_PLAN = "hetero-plan"
SIMULATION_ENTRIES = (HETERO_PLAN,)  # round entries only the simulator's ClientApp mods consume

# ---- a release's MetricRecord (client -> server) ------------------------------------------
NUM_EXAMPLES, STEPS, BYTES_UP = "num-examples", "steps", "bytes-up"
EPSILON, DELTA, NOISE_MULTIPLIER, SAMPLE_RATE = "epsilon", "delta", "noise-multiplier", "sample-rate"
TRAIN_LOSS, TRAIN_LOSS_FIRST, TRAIN_LOSS_LAST = "train-loss", "train-loss-first", "train-loss-last"
SAMPLES_SEEN, SECONDS = "samples-seen", "seconds"
# What a DP reply may carry: the example count (public: the neighbouring relation is
# replace-one), the mechanism's own parameters and its epsilon, the upload size. Training
# loss, Poisson batch sizes and wall time are functions of the private data: they stay on the node.
DP_METRICS = frozenset({NUM_EXAMPLES, STEPS, BYTES_UP, EPSILON, DELTA, NOISE_MULTIPLIER, SAMPLE_RATE})
# A personalised evaluation's last-round values (fedpeft.client.personal_eval): the accuracy of
# the client's own model on its held-out split -- under DP a Gaussian release recorded in the
# client's ledger, which the client checks before sending -- and the public held-out count.
PERSONAL_ACCURACY, PERSONAL_EXAMPLES = "personal-accuracy", "personal-examples"
PERSONAL_METRICS = frozenset({PERSONAL_ACCURACY, PERSONAL_EXAMPLES})

# ---- a release's INFO and a refusal's STATUS (client -> server) ---------------------------
CLIENT, ACCOUNTANT, PROFILE = "client", "accountant", "profile"
REFUSED, REASON, TIMED_OUT, HETERO_SKIP = "refused", "reason", "timed-out", "hetero-skip"

# ---- node config (the node operator's; read by the client) --------------------------------
PARTITION_ID, CLIENT_ID, DATA_PATH = "partition-id", "client-id", "data-path"
TEXT_COLUMN, LABEL_COLUMN, TASK = "text-column", "label-column", "task"
MAX_EPSILON, MAX_DELTA, MIN_NOISE_MULTIPLIER = "max-epsilon", "max-delta", "min-noise-multiplier"
WARM_WORKER, WARM_IDLE_S = "warm-worker", "warm-idle-s"  # the node's warm worker (fedpeft.client.warm)

# ---- Context.state (in-process, simulation only) ------------------------------------------
DEVICE_STATE = "fedpeft-sim-device"


class ProtocolError(ValueError):
    """A message that does not follow this protocol (the text names the key, never a value)."""


# ---- state <-> ArrayRecord ----------------------------------------------------------------
def state_to_arrayrecord(state: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Named arrays as an ArrayRecord (C-contiguous copies where needed), in the state's order."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in state.items()})


def arrayrecord_to_state(record: ArrayRecord) -> dict[str, np.ndarray]:
    """The named numpy arrays of an ArrayRecord, in its order."""
    return {k: v.numpy() for k, v in record.items()}


def state_nbytes(state: Mapping[str, np.ndarray]) -> int:
    """Raw payload bytes (element count x item size), excluding serialisation headers."""
    return int(sum(v.nbytes for v in state.values()))


def record_nbytes(record: ArrayRecord) -> int:
    """:func:`state_nbytes` of an ArrayRecord, from its declared shapes and dtypes."""
    return int(sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in record.values()))


# ---- the round's configuration ------------------------------------------------------------
@dataclass(frozen=True)
class RoundConfig:
    """The fixed entries of a TRAIN message's ``CONFIG`` record (module doc)."""

    server_round: int
    config_toml: str
    config_hash: str
    frozen_hash: str = ""
    attempt: int = 0

    def to_record(self, extra: Mapping[str, Any] | None = None) -> ConfigRecord:
        """The ConfigRecord the server sends; ``extra`` adds e.g. ``LEDGER_DIR``, ``LABEL_NAMES``."""
        return ConfigRecord({
            SERVER_ROUND: self.server_round, CONFIG_TOML: self.config_toml, CONFIG_HASH: self.config_hash,
            FROZEN_HASH: self.frozen_hash, ATTEMPT: self.attempt, **dict(extra or {}),
        })

    @classmethod
    def from_record(cls, conf: Mapping[str, Any]) -> RoundConfig:
        """Parse what a client received; :class:`ProtocolError` names a missing or malformed entry."""
        for key in (SERVER_ROUND, CONFIG_TOML, CONFIG_HASH):
            if key not in conf:
                raise ProtocolError(f"the round's configuration has no {key!r} entry")
        try:
            server_round, attempt = int(conf[SERVER_ROUND]), int(conf.get(ATTEMPT, 0))
        except (TypeError, ValueError):
            raise ProtocolError(f"the round's {SERVER_ROUND!r} and {ATTEMPT!r} must be integers") from None
        return cls(server_round, str(conf[CONFIG_TOML]), str(conf[CONFIG_HASH]), str(conf.get(FROZEN_HASH, "")),
                   attempt)


def round_config_of(msg: Message) -> ConfigRecord:
    """The ``CONFIG`` record of a TRAIN message (:class:`ProtocolError` when it has none)."""
    conf = msg.content.config_records.get(CONFIG)
    if conf is None:
        raise ProtocolError(f"the message has no {CONFIG!r} record")
    return conf


# ---- replies ------------------------------------------------------------------------------
def diagnostics(loss_mean: float, loss_first: float, loss_last: float, samples_seen: int,
                seconds: float) -> dict[str, Any]:
    """The training diagnostics of a round (sent only without DP; logged on the node under DP)."""
    return {TRAIN_LOSS: loss_mean, TRAIN_LOSS_FIRST: loss_first, TRAIN_LOSS_LAST: loss_last,
            SAMPLES_SEEN: samples_seen, SECONDS: seconds}


def reply_metrics(dp: bool, examples: int, steps: int, nbytes: int, epsilon: float, delta: float,
                  sigma: float | None, sample_rate: float, diag: Mapping[str, Any]) -> dict[str, Any]:
    """A release's metrics: under DP exactly :data:`DP_METRICS`; without DP the diagnostics too."""
    public: dict[str, Any] = {NUM_EXAMPLES: examples, STEPS: steps, BYTES_UP: nbytes}
    if not dp:
        return {**public, **diag, EPSILON: float("inf"), NOISE_MULTIPLIER: 0.0}
    return {**public, EPSILON: epsilon, DELTA: delta, NOISE_MULTIPLIER: float(sigma or 0.0), SAMPLE_RATE: sample_rate}


def check_dp_metrics(metrics: Mapping[str, Any]) -> None:
    """Raise (naming only keys) if ``metrics`` holds anything a DP reply may not carry."""
    extra = sorted(set(metrics) - DP_METRICS)
    if extra:
        raise ProtocolError(f"a DP reply may not carry {', '.join(extra)}; allowed: {', '.join(sorted(DP_METRICS))}")


def train_reply(msg: Message, state: Mapping[str, np.ndarray], metrics: Mapping[str, Any],
                info: Mapping[str, Any]) -> Message:
    """A release: the trained state, its metrics and the client's info record."""
    content = RecordDict({ARRAYS: state_to_arrayrecord(state), METRICS: MetricRecord(dict(metrics)),
                          INFO: ConfigRecord(dict(info))})
    return Message(content=content, reply_to=msg)


def status_reply(msg: Message, status: Mapping[str, Any]) -> Message:
    """A reply without a release (no arrays): its ``STATUS`` record only."""
    return Message(content=RecordDict({STATUS: ConfigRecord(dict(status))}), reply_to=msg)


def refusal(msg: Message, client: str, reason: str, epsilon: float | None = None,
            hetero_skip: bool = False) -> Message:
    """A refusal: ``REFUSED``, the ``CLIENT``, the ``REASON`` (written to carry no data), the
    ``EPSILON`` already spent when known, ``HETERO_SKIP`` when an emulated device sits out."""
    status: dict[str, Any] = {REFUSED: True, CLIENT: client, REASON: reason}
    if hetero_skip:
        status[HETERO_SKIP] = True
    if epsilon is not None:
        status[EPSILON] = epsilon
    return status_reply(msg, status)


def timed_out(msg: Message, client: str, reason: str, epsilon: float) -> Message:
    """An emulated lost reply (``TIMED_OUT``): the client trained and spent ``EPSILON``."""
    return status_reply(msg, {TIMED_OUT: True, CLIENT: client, EPSILON: epsilon, REASON: reason})


# ---- device emulation (simulation only) ---------------------------------------------------
@dataclass(frozen=True)
class DeviceDirective:
    """The emulated device a simulated client trains as, from its entry of ``HETERO_PLAN``.

    ``physical_batch``: the largest batch its memory holds (Opacus virtual steps; the logical
    batch and the DP mechanism are unchanged); ``rank``: its rank tier. Travels in
    ``Context.state`` (``DEVICE_STATE``), never in a message (module doc).
    """

    profile: str
    physical_batch: int
    rank: int

    def replay_part(self) -> str:
        """The directive as it enters the client's replay key (in the form the first release
        format used, so stored releases stay valid)."""
        return json.dumps({"profile": self.profile, "physical_batch": self.physical_batch, "rank": self.rank,
                           "skip": ""}, sort_keys=True)

    def store(self, state: RecordDict) -> None:
        state[DEVICE_STATE] = ConfigRecord({PROFILE: self.profile, "physical-batch": self.physical_batch,
                                            "rank": self.rank})

    @staticmethod
    def clear(state: RecordDict) -> None:
        if DEVICE_STATE in state:
            del state[DEVICE_STATE]

    @classmethod
    def read(cls, state: RecordDict) -> DeviceDirective | None:
        rec = state.get(DEVICE_STATE)
        if not isinstance(rec, ConfigRecord):
            return None
        return cls(str(rec[PROFILE]), int(rec["physical-batch"]), int(rec["rank"]))  # type: ignore[arg-type]


def encode_hetero_plan(profiles: Sequence[str], assign: Sequence[int], plan: Mapping[str, tuple[int, int]],
                       skip: Mapping[str, str]) -> str:
    """The ``HETERO_PLAN`` entry: profile names, each client's profile index (by partition id),
    ``(physical batch, rank)`` per profile, and why a client sits the round out (by partition id)."""
    return json.dumps({
        "profiles": list(profiles), "assign": list(assign),
        "plan": {n: {"physical_batch": b, "rank": r} for n, (b, r) in plan.items()},
        "skip": dict(skip),
    }, separators=(",", ":"))


def decode_hetero_plan(raw: str, partition_id: int) -> tuple[DeviceDirective, str]:
    """This client's entry of a ``HETERO_PLAN``: its directive and its reason to skip ("" = train)."""
    try:
        plan = json.loads(raw)
        profile = plan["profiles"][plan["assign"][partition_id]]
        entry = plan["plan"][profile]
        return (DeviceDirective(str(profile), int(entry["physical_batch"]), int(entry["rank"])),
                str(plan["skip"].get(str(partition_id), "")))
    except (ValueError, KeyError, IndexError, TypeError):
        raise ProtocolError(f"the round's {HETERO_PLAN!r} has no valid entry for partition {partition_id}") from None
