"""Heterogeneous-client emulation: device profiles, memory and time models, deadline
policies, a server hook and plots (see docs/hetero.md)."""

from fedpeft.sim.hetero.memory import (
    DecoderShape,
    EncoderShape,
    MemoryDecision,
    MemoryEstimate,
    ModelShape,
    TrainShape,
    decide,
    estimate,
    model_shape,
)
from fedpeft.sim.hetero.profiles import DeviceProfile, load_catalogue
from fedpeft.sim.hetero.scenario import Scenario, load_scenario, scenario_names
from fedpeft.sim.hetero.timing import ClientTiming, StepCost, client_timing, expected_batch
from fedpeft.strategies.deadlines import POLICIES, DeadlinePolicy, resolve_round

__all__ = [
    "POLICIES", "ClientTiming", "DeadlinePolicy", "DecoderShape", "DeviceProfile", "EncoderShape", "MemoryDecision",
    "MemoryEstimate", "ModelShape", "Scenario", "StepCost", "TrainShape", "client_timing", "decide", "estimate",
    "expected_batch", "load_catalogue", "load_scenario", "model_shape", "resolve_round", "scenario_names",
]
