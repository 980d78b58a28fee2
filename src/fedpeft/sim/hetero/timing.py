"""Simulated round time of one client, from public quantities only.

A client's simulated time is the time it would take on its own device:

    download = bytes_down * 8 / downlink            (the global state)
    compute  = estimated host seconds * host TFLOPS / device TFLOPS
    upload   = bytes_up * 8 / uplink                 (its reply: rank r_i columns only)

**Why compute is estimated, not measured.** In a DP run the server is the adversary
DP-SGD protects against, and a client's wall-clock training time is not covered by the
privacy accountant: it depends on the sizes of the private Poisson batches and on the
lengths of the client's own snippets (the trainer trims every chunk to its longest
example), so it is a timing side channel. Clients therefore no longer report ``seconds``
in DP runs (``src/fedpeft/client/app.py``), and the emulation never uses a client's timing, with or
without DP (one model for both, so DP and non-DP runs of a scenario are emulated alike).
Instead the *server* prices a step with its own model on its own held-out data
(:func:`fedpeft.sim.hetero.cost.measure_step_cost`, once at the start of the run) and the
host compute of a client is

    estimated host seconds = steps * expected batch * server seconds per example

where ``steps`` is what the client reports (the accountant counts every step) and the
expected logical batch is ``sample_rate * num_examples`` -- for a Poisson batch its mean,
without DP the mean batch over an epoch -- with ``num_examples`` public by design (the
FedAvg weight) and the sample rate a function of it and ``train.batch_size``
(:func:`fedpeft.privacy.plan.sample_rate_for`).

The estimate is then scaled by the ratio of peak FP32 throughput between the host (the
scenario's ``host_profile``: the machine the server measured on, which in a simulation is
the one the clients run on) and the emulated device. Limits: the cost is linear in the
examples of a step (a step's fixed cost -- optimizer update, noise -- is spread over the
measured batch); it uses the server's test snippets' lengths, not the client's (which is
the point); peak-FLOPS ratios ignore memory bandwidth, kernel efficiency and the smaller
physical batch or rank an adapted client uses; link times ignore latency, TCP slow start
and serialisation overhead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedpeft.privacy.plan import sample_rate_for
from fedpeft.sim.hetero.profiles import DeviceProfile

__all__ = ["COMPUTE_SOURCE", "ClientTiming", "StepCost", "client_timing", "expected_batch", "transfer_seconds"]

COMPUTE_SOURCE = "server cost model"
"""What the timeline's ``compute_source`` says: compute time is the server's estimate."""


def transfer_seconds(nbytes: float, mbps: float) -> float:
    """Seconds to move ``nbytes`` over a link of ``mbps`` megabits per second."""
    return float(nbytes) * 8.0 / (mbps * 1e6)


@dataclass(frozen=True)
class StepCost:
    """The server's price of training: host seconds per example of one logical step.

    Measured by the server on its own model and held-out data
    (:func:`fedpeft.sim.hetero.cost.measure_step_cost`); never a client's measurement.
    """

    seconds_per_example: float
    batch: int = 0  # examples per step the server measured with (0: set by hand, e.g. in tests)
    steps: int = 0  # steps it timed
    dp: bool = False  # with per-sample gradients and clipping, as a DP client trains
    device: str = ""
    source: str = COMPUTE_SOURCE

    def __post_init__(self) -> None:
        if not (self.seconds_per_example >= 0 and math.isfinite(self.seconds_per_example)):
            raise ValueError(f"seconds per example must be finite and >= 0, got {self.seconds_per_example}")

    def host_seconds(self, steps: float, batch: float) -> float:
        """Estimated host compute of ``steps`` logical steps of ``batch`` examples each."""
        if steps < 0 or batch < 0:
            raise ValueError(f"steps and batch must be >= 0, got {steps} and {batch}")
        return float(steps) * float(batch) * self.seconds_per_example


def expected_batch(num_examples: float, batch_size: int, sample_rate: float | None = None) -> float:
    """Mean logical batch of a client with ``num_examples`` examples: ``q * n``.

    ``q`` is the reported ``sample_rate`` when there is one (a DP reply carries the rate
    its accountant used), else :func:`fedpeft.privacy.plan.sample_rate_for` of ``n`` and the
    configured ``batch_size`` -- the same number, computed from public quantities.
    """
    n = int(num_examples)
    if n < 1:
        return 0.0
    q = sample_rate if sample_rate is not None and 0 < sample_rate <= 1 else sample_rate_for(n, batch_size)
    return q * n


@dataclass(frozen=True)
class ClientTiming:
    """One client's simulated phases in one round, in seconds from the round start."""

    download_s: float
    compute_s: float
    upload_s: float

    @property
    def total_s(self) -> float:
        return self.download_s + self.compute_s + self.upload_s


def client_timing(
    profile: DeviceProfile, host: DeviceProfile, host_compute_s: float, bytes_down: float, bytes_up: float
) -> ClientTiming:
    """Scale the estimated host compute ``host_compute_s`` to ``profile`` and add its link times."""
    if not host_compute_s >= 0:
        raise ValueError(f"host compute seconds must be >= 0, got {host_compute_s}")
    return ClientTiming(
        download_s=transfer_seconds(bytes_down, profile.downlink_mbps),
        compute_s=host_compute_s * host.tflops / profile.tflops,
        upload_s=transfer_seconds(bytes_up, profile.uplink_mbps),
    )
