"""Simulated round time of one client.

A client's simulated time is the time it would take on its own device:

    download = bytes_down * 8 / downlink            (the global state)
    compute  = measured compute seconds on this host * host TFLOPS / device TFLOPS
    upload   = bytes_up * 8 / uplink                 (its reply: rank r_i columns only)

Compute is the *measured* local training time of the real run (``seconds`` in the
client's reply), scaled by the ratio of peak FP32 throughput between the host that ran it
(the scenario's ``host_profile``) and the emulated device. Limits: peak-FLOPS ratios
ignore memory bandwidth, kernel efficiency and the smaller physical batch an adapted client
uses; link times ignore latency, TCP slow start and serialisation overhead.
"""

from __future__ import annotations

from dataclasses import dataclass

from simulations.hetero.profiles import DeviceProfile

__all__ = ["ClientTiming", "client_timing", "transfer_seconds"]


def transfer_seconds(nbytes: float, mbps: float) -> float:
    """Seconds to move ``nbytes`` over a link of ``mbps`` megabits per second."""
    return float(nbytes) * 8.0 / (mbps * 1e6)


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
    profile: DeviceProfile, host: DeviceProfile, measured_compute_s: float, bytes_down: float, bytes_up: float
) -> ClientTiming:
    """Scale the measured compute to ``profile`` and add its link times."""
    if measured_compute_s < 0:
        raise ValueError(f"measured compute seconds must be >= 0, got {measured_compute_s}")
    return ClientTiming(
        download_s=transfer_seconds(bytes_down, profile.downlink_mbps),
        compute_s=measured_compute_s * host.tflops / profile.tflops,
        upload_s=transfer_seconds(bytes_up, profile.uplink_mbps),
    )
