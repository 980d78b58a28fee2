"""FLoRA (``flora``): fresh adapters every round, possibly of heterogeneous ranks; the server
stacks them, folds ``B_stack @ A_stack = sum_k p_k B_k A_k`` into the frozen weight and restarts
the adapters, so the aggregate is exact for any mix of ranks (zero-padded averaging of a
trained A is not: the control below)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from lora_fold_helpers import (
    attached,
    dp_step_matches_clipped_per_example_mean,
    effective_weights,
    federate_and_resume,
    learns_beyond_random,
    one_dp_round,
    random_global,
    weighted,
)

from fedpeft.adapters.common import weighted_mean
from fedpeft.adapters.ffa_lora_hetero import pad_state
from fedpeft.adapters.flora import fresh_a, stack
from fedpeft.adapters.lora import lora_layers
from fedpeft.adapters.lora_fold import DELTA_SUFFIX, delta_key
from fedpeft.client.trainer import train_local
from fedpeft.data.sources import train_test_split_for
from fedpeft.privacy.randomness import NodeSecret, RoundRandomness
from fedpeft.tasks.model import load_tokenizer

METHOD = "flora"
RANK = 4


def _client(plugin, model, global_state, rank: int, seed: int):  # type: ignore[no-untyped-def]
    """A client of rank ``rank``: installs the global state, "trains" (random A[:r], B[:, :r]);
    returns (its effective weights, its reply as the server receives it)."""
    plugin.load_state(model, global_state)
    plugin.set_client_rank(model, rank)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            a[:rank] = torch.randn(a[:rank].shape, generator=gen) * 0.3
            b[:, :rank] = torch.randn(b[:, :rank].shape, generator=gen) * 0.3
    reply = {k: v.detach().numpy().copy() for k, v in plugin.trainable_state(model).items()}
    return effective_weights(model), reply


def test_what_travels_each_way_and_a_rank_r_client_sends_r_components(tiny_cfg) -> None:  # type: ignore[no-untyped-def]
    from fedpeft.server.setup import ServerSetup

    plugin, cfg, model = attached(tiny_cfg, METHOD, rank=RANK)
    layers = [n for n, _ in lora_layers(model)]
    full = {k: tuple(v.shape) for k, v in plugin.trainable_state(model).items()}
    assert {k for k in full if "lora_" in k} == {f"{n}.lora_{x}.default.weight" for n in layers for x in "AB"}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(full)  # base weights frozen
    setup = ServerSetup(cfg)
    assert set(setup.spec.tensors) == set(full)
    assert set(setup.state) == set(full) | {delta_key(n) for n in layers}
    plugin.set_client_rank(model, 2)
    for k, v in plugin.trainable_state(model).items():
        want = (full[k][0], 2) if "lora_B" in k else (2, full[k][1]) if "lora_A" in k else full[k]
        assert tuple(v.shape) == want, k
    with pytest.raises(ValueError, match="outside"):
        plugin.set_client_rank(model, RANK + 1)


def test_stacking_heterogeneous_ranks_is_exact_and_zero_padded_averaging_is_not(tiny_cfg) -> None:  # type: ignore[no-untyped-def]
    plugin, cfg, model = attached(tiny_cfg, METHOD, rank=RANK, alpha=8.0)
    sent_out = random_global(plugin, model, seed=0)  # the round's global state, with a non-zero D
    shapes = {k: v.shape for k, v in sent_out.items()}
    ranks, weights = [4, 2, 1], [5.0, 3.0, 1.0]
    clients, replies = [], []
    for i, r in enumerate(ranks):
        eff, reply = _client(plugin, model, sent_out, r, seed=10 + i)
        clients.append(eff)
        replies.append(pad_state(reply, shapes))  # what the heterogeneous-rank emulation does
    assert all(v.shape == shapes[k] for rep in replies for k, v in rep.items())
    new = plugin.server_step(3, plugin.aggregate(replies, weights, sent_out), cfg)
    plugin.load_state(model, new)
    got, want = effective_weights(model), weighted(clients, weights)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=2e-6 * np.abs(want[name]).max())
    # the stack's product is the weighted sum of the clients' products
    p = np.asarray(weights) / sum(weights)
    for layer, (b_stack, a_stack) in stack(replies, weights).items():
        a, b = f"{layer}.lora_A.default.weight", f"{layer}.lora_B.default.weight"
        assert b_stack.shape[1] == a_stack.shape[0] == RANK * len(ranks)
        np.testing.assert_allclose(b_stack @ a_stack, sum(pk * (s[b].astype(np.float64) @ s[a]) for pk, s in
                                                          zip(p, replies, strict=True)), atol=1e-10)
    # control: the zero-padded mean of a trained A and B (HeteroLoRA-style) misses the target
    plugin.load_state(model, {**weighted_mean(replies, weights),
                              **{k: v for k, v in sent_out.items() if k.endswith(DELTA_SUFFIX)}})
    padded_mean = effective_weights(model)
    assert max(np.abs(padded_mean[n] - want[n]).max() for n in want) > 1e-3


def test_the_next_round_starts_fresh_adapters_from_the_seed_and_round(tiny_cfg) -> None:  # type: ignore[no-untyped-def]
    plugin, cfg, model = attached(tiny_cfg, METHOD, rank=RANK)
    state = random_global(plugin, model, seed=1)
    one, two = plugin.server_step(1, state, cfg), plugin.server_step(2, state, cfg)
    for k in state:
        if "lora_B" in k:
            assert not one[k].any()
        elif "lora_A" in k:
            assert one[k].shape == state[k].shape and one[k].dtype == state[k].dtype
            assert np.array_equal(one[k], plugin.server_step(1, state, cfg)[k])  # deterministic
            assert not np.array_equal(one[k], two[k])  # a new A every round
            assert np.abs(one[k]).max() <= 1 / np.sqrt(state[k].shape[1])
        else:
            assert np.array_equal(one[k], state[k])  # head and D pass unchanged
    assert fresh_a((2, 3), 0, 1, 0).shape == (2, 3)


@pytest.mark.parametrize("rank", [RANK, 2])
def test_dp_sgd_clips_every_example_at_full_and_reduced_rank(tiny_cfg, rank: int) -> None:  # type: ignore[no-untyped-def]
    plugin = attached(tiny_cfg, METHOD)[0]

    def make(cfg):  # type: ignore[no-untyped-def]
        _, _, model = attached(cfg, METHOD, rank=RANK)
        plugin.load_state(model, random_global(plugin, model, seed=7))  # non-zero B and D: gradients reach A
        plugin.set_client_rank(model, rank)
        return model

    dp_step_matches_clipped_per_example_mean(tiny_cfg, plugin, make)


def test_under_dp_noise_the_unused_ranks_do_not_act(tiny_cfg) -> None:  # type: ignore[no-untyped-def]
    """A rank-2 client's model after noisy DP steps computes exactly what its reply says
    (A[:2], B[:, :2]): DP noise lands on the unused rows and columns, the mask keeps it out."""
    plugin, cfg, model = attached(tiny_cfg, METHOD, rank=RANK)
    plugin.load_state(model, random_global(plugin, model, seed=3))
    plugin.set_client_rank(model, 2)
    pool, _ = train_test_split_for(cfg.data, cfg.seed)
    data, tok = pool.subset(list(range(16))), load_tokenizer(cfg.model)
    train_local(model, plugin, tok, data, cfg, 2, torch.device("cpu"), 1.0,
                RoundRandomness.derived(NodeSecret.generate(), "t"))
    a = next(layer.lora_A["default"].weight for _, layer in lora_layers(model))
    assert a[2:].abs().sum() > 0  # the noise did land there
    enc = tok(list(data.texts), truncation=True, max_length=24, padding=True, return_tensors="pt")
    with torch.no_grad():
        before = model(**enc).logits
        for _, layer in lora_layers(model):
            layer.lora_A["default"].weight[2:] = 0
            layer.lora_B["default"].weight[:, 2:] = 0
        plugin.set_client_rank(model, RANK)  # no mask: only what the reply carries acts
        after = model(**enc).logits
    torch.testing.assert_close(before, after)


def test_the_adapter_alone_learns_beyond_a_random_update(tiny_cfg) -> None:  # type: ignore[no-untyped-def]
    learns_beyond_random(tiny_cfg, METHOD)


def test_two_rounds_in_process_and_a_resume_restores_the_folded_stack(tiny_model_dir: Path, tmp_path: Path,
                                                                      flwr_identity) -> None:  # type: ignore[no-untyped-def]
    final = federate_and_resume(tiny_model_dir, tmp_path, METHOD)
    assert all(not v.any() for k, v in final.items() if "lora_B" in k)  # the next round starts from B = 0


HETERO = """name = "flora-ranks"
host_profile = "Host-2core-CPU"
rank_tiers = [4, 2]

[clients]
Big = 1
Small = 1

[ranks]
Big = 4
Small = 2

[profiles.Big]
tflops = 1000.0
memory_gb = 80.0
uplink_mbps = 1000.0
downlink_mbps = 1000.0
[profiles.Small]
tflops = 1000.0
memory_gb = 80.0
uplink_mbps = 1000.0
downlink_mbps = 1000.0
"""


def test_heterogeneous_ranks_through_the_device_emulation_in_process(tiny_model_dir: Path, tmp_path: Path,
                                                                     flwr_identity) -> None:  # type: ignore[no-untyped-def]
    """The heterogeneous-rank machinery ffa_lora_hetero uses (fedpeft.sim.hetero): a rank-2 client
    sends A[:2] and B[:, :2], the emulator zero-pads both, every reply is accepted and folded."""
    from lora_fold_helpers import RecordingGrid, federation_cfg

    from fedpeft.server.checkpoint import load_checkpoint
    from fedpeft.server.loop import run_federation
    from fedpeft.sim.hetero.hook import HeteroEmulator
    from fedpeft.sim.hetero.scenario import load_scenario
    from fedpeft.sim.hetero.timing import StepCost
    from fedpeft.sim.mods import simulation_app

    (tmp_path / "s.toml").write_text(HETERO)
    scenario = load_scenario(str(tmp_path / "s.toml"))
    cfg = federation_cfg(tiny_model_dir, tmp_path / "run", METHOD, rounds=1)
    emulator = HeteroEmulator(scenario, cfg, step_cost=StepCost(seconds_per_example=0.01, batch=16, steps=1))
    grid = RecordingGrid(2, app=simulation_app())
    rows = run_federation(grid, cfg, tmp_path / "run", hooks=[emulator], round_timer=emulator)  # type: ignore[arg-type]
    assert rows[0]["clients_accepted"] == 2 and not rows[0]["rejected"]
    a_rows = sorted({shape[0] for shapes in grid.reply_shapes for k, shape in shapes.items() if "lora_A" in k})
    b_cols = sorted({shape[1] for shapes in grid.reply_shapes for k, shape in shapes.items() if "lora_B" in k})
    assert a_rows == b_cols == [2, RANK]  # one client at each rank
    state = load_checkpoint(tmp_path / "run" / "checkpoint.npz").state
    assert all(np.abs(v).max() > 0 for k, v in state.items() if k.endswith(DELTA_SUFFIX))


def test_one_dp_sgd_round_in_process(tiny_model_dir: Path, tmp_path: Path, flwr_identity) -> None:  # type: ignore[no-untyped-def]
    state = one_dp_round(tiny_model_dir, tmp_path, METHOD)
    assert all(not v.any() for k, v in state.items() if "lora_B" in k)
