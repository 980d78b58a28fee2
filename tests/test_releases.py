"""One-off Gaussian releases (``fedpeft.privacy.releases``) beyond the ICM-LoRA tests in
tests/test_icm_lora.py: the exact noisy mean a given generator produces, the refusals, the
relation and plan a release passes on to the ledger, and a second release on a planned ledger.

The sigma calibration itself (tens of PLD evaluations) is tested in tests/test_icm_lora.py and
tests/test_privacy.py; here it is replaced by a recorder (``fake_calibration``) so that what
``releases`` hands it and does with its answer is checked in a second (the mutation run's
covering tests must be fast)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedpeft.privacy import releases
from fedpeft.privacy.accounting import Calibration, epsilon_for
from fedpeft.privacy.ledger import Ledger
from fedpeft.privacy.releases import calibrate_after, clipped_noisy_mean, record_release, release_entry

Q, STEPS, DELTA = 0.25, 12, 1e-5


@pytest.fixture
def fake_calibration(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    """``releases.calibrate_noise`` replaced by a recorder: sigma = 1.5 + 0.25 per call so far."""
    calls: list[tuple[Any, ...]] = []

    def fake(target: float, delta: float, q: float, steps: int, accountant: str, *, prior: tuple[Any, ...],
             relation: str) -> Calibration:
        calls.append((target, delta, q, steps, accountant, prior, relation))
        return Calibration(1.5 + 0.25 * (len(calls) - 1), q, steps, target - 0.01, accountant, relation)

    monkeypatch.setattr(releases, "calibrate_noise", fake)
    return calls


def test_clipped_noisy_mean_refuses_what_is_not_a_non_empty_matrix() -> None:
    for bad in (torch.ones(3), torch.ones(0, 3), torch.ones(2, 2, 2)):
        with pytest.raises(ValueError, match=r"^expected a non-empty \(n, d\) matrix of per-example vectors$"):
            clipped_noisy_mean(bad, clip=1.0, sigma=1.0)
    one = clipped_noisy_mean(torch.tensor([[0.3, 0.4]]), clip=1.0, sigma=0.0)  # a single example is a matrix
    torch.testing.assert_close(one, torch.tensor([0.3, 0.4]))


def test_clipped_noisy_mean_is_the_clipped_sum_plus_sigma_clip_noise_over_n() -> None:
    """With a given generator the release is exactly ``(sum clip_C(v_i) + sigma C z) / n``,
    z the generator's float64 standard normals; C = 2 and sigma < 1 so that neither a
    sigma-only nor a sigma/C noise scale, nor a threshold at sigma = 1, passes."""
    gen = torch.Generator().manual_seed(5)
    v = torch.randn(5, 64, generator=gen, dtype=torch.float32) * torch.tensor([[0.1], [1.0], [3.0], [10.0], [1.9]])
    clip, sigma = 2.0, 0.5
    v64 = v.double()
    norms = v64.norm(dim=1, keepdim=True)
    clipped = torch.where(norms > clip, v64 * clip / norms, v64).sum(0)
    # 64 dims: torch draws float32 and float64 normals alike below 16 elements, differently above
    z = torch.randn(64, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    expected = ((clipped + z * sigma * clip) / 5).float()
    got = clipped_noisy_mean(v, clip, sigma, torch.Generator().manual_seed(11))
    assert got.dtype == torch.float32 and got.shape == (64,)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
    clean = clipped_noisy_mean(v, clip, 0.0)
    torch.testing.assert_close(clean, (clipped / 5).float(), rtol=1e-6, atol=1e-7)
    assert not torch.equal(got, clean)


def test_calibrate_after_passes_the_relation_and_the_prior_to_the_calibration(
        fake_calibration: list[tuple[Any, ...]]) -> None:
    prior = [release_entry(3.0)]
    for relation in ("replace-one", "add-remove"):
        plan = calibrate_after(prior, 6.0, DELTA, Q, STEPS, "pld", relation)
        assert fake_calibration[-1] == (6.0, DELTA, Q, STEPS, "pld", tuple(prior), relation)
        assert plan.relation == relation and plan.noise_multiplier == 1.5 + 0.25 * (len(fake_calibration) - 1)
    calibrate_after([], 6.0, DELTA, Q, STEPS, "pld")
    assert fake_calibration[-1] == (6.0, DELTA, Q, STEPS, "pld", (), "replace-one")


def test_the_release_alone_is_judged_under_the_ledgers_relation(fake_calibration: list[tuple[Any, ...]]) -> None:
    """A release that spends less than the target under add/remove but more under replace-one
    (sensitivity 2) is refused only under replace-one; a target the release alone spends
    exactly is refused too."""
    prior = [release_entry(2.0)]
    add_remove, _ = epsilon_for(prior, DELTA, "pld", "add-remove")
    replace_one, _ = epsilon_for(prior, DELTA, "pld", "replace-one")
    assert add_remove < replace_one
    target = (add_remove + replace_one) / 2
    calibrate_after(prior, target, DELTA, Q, STEPS, "pld", "add-remove")
    assert len(fake_calibration) == 1
    with pytest.raises(ValueError, match=r"the releases alone spend epsilon=\d+\.\d{3} >= the budget"):
        calibrate_after(prior, target, DELTA, Q, STEPS, "pld", "replace-one")
    with pytest.raises(ValueError, match="releases alone"):
        calibrate_after(prior, replace_one, DELTA, Q, STEPS, "pld", "replace-one")
    assert len(fake_calibration) == 1  # refused before any calibration


def _release(path: Path, payload: np.ndarray, **extra: object) -> Ledger:
    kwargs: dict[str, object] = {"target_epsilon": 6.0, "delta": DELTA, "accountant": "pld", "sigma": 4.0,
                                 "sample_rate": Q, "planned_steps": STEPS, "tag": "task-vector", "payload": payload}
    kwargs.update(extra)
    return record_release(path, "7", **kwargs)  # type: ignore[arg-type]


def test_a_first_release_plans_the_run_and_records_what_was_released(tmp_path: Path,
                                                                    fake_calibration: list[tuple[Any, ...]]) -> None:
    path = tmp_path / "client-7.json"
    payload = np.arange(6, dtype=np.float32).reshape(2, 3)[:, ::2]  # not contiguous: hashed as its C-order bytes
    ledger = _release(path, payload)
    assert fake_calibration == [(6.0, DELTA, Q, STEPS, "pld", (release_entry(4.0),), "replace-one")]
    assert (ledger.noise_multiplier, ledger.sample_rate, ledger.planned_steps) == (1.5, Q, STEPS)
    assert ledger.plan_offset == 1 and ledger.plan_steps_left == STEPS  # the plan covers the steps after it
    (entry,) = ledger.entries
    assert (entry.round, entry.noise_multiplier, entry.sample_rate, entry.steps) == (0, 4.0, 1.0, 1)
    assert entry.replay_key == "release:task-vector"
    assert entry.output_hash == hashlib.sha256(np.ascontiguousarray(payload).tobytes()).hexdigest()
    assert (entry.epsilon_after, entry.accountant) == epsilon_for([(4.0, 1.0, 1)], DELTA, "pld")
    assert Ledger.from_json(path.read_text()).to_json() == ledger.to_json()  # saved as returned


def test_a_release_on_a_planned_ledger_eats_into_its_plan(tmp_path: Path,
                                                         fake_calibration: list[tuple[Any, ...]]) -> None:
    path = tmp_path / "client-7.json"
    first = _release(path, np.ones(3, np.float32))
    sigma, offset = first.noise_multiplier, first.plan_offset
    second = _release(path, np.zeros(3, np.float32), sigma=5.0, tag="again")
    assert (second.noise_multiplier, second.plan_offset, second.planned_steps) == (sigma, offset, STEPS)
    assert second.history == [(4.0, 1.0, 1), (5.0, 1.0, 1)]
    assert second.entries[1].epsilon_after == epsilon_for(second.history, DELTA, "pld")[0]
    assert second.entries[1].replay_key == "release:again" and len(fake_calibration) == 1
    # a ledger planned by ensure_plan but without entries yet keeps that plan too
    other = tmp_path / "client-8.json"
    Ledger("7", 6.0, DELTA, noise_multiplier=0.9, sample_rate=Q, planned_steps=STEPS).save(other)
    after = _release(other, np.ones(3, np.float32))
    assert (after.noise_multiplier, after.plan_offset, len(fake_calibration)) == (0.9, 0, 1)


def test_a_release_under_add_remove_is_planned_and_recorded_under_add_remove(
        tmp_path: Path, fake_calibration: list[tuple[Any, ...]]) -> None:
    ledger = _release(tmp_path / "client-7.json", np.ones(3, np.float32), relation="add-remove")
    assert ledger.relation == "add-remove"
    assert fake_calibration == [(6.0, DELTA, Q, STEPS, "pld", (release_entry(4.0),), "add-remove")]
    assert ledger.entries[0].epsilon_after == epsilon_for([(4.0, 1.0, 1)], DELTA, "pld", "add-remove")[0]


def test_release_epsilon_is_accounted_under_the_relation_asked() -> None:
    from fedpeft.privacy.releases import release_epsilon

    add_remove = release_epsilon(2.0, DELTA, "pld", "add-remove")
    assert add_remove == epsilon_for([release_entry(2.0)], DELTA, "pld", "add-remove")
    assert add_remove[0] < release_epsilon(2.0, DELTA)[0]  # replace-one (the default): sensitivity 2


def test_the_clipped_sum_is_computed_in_float64_and_leaves_tiny_vectors_alone() -> None:
    """257 unit vectors in bfloat16 sum to 257 only if the sum is not taken in bfloat16 (8
    significant bits: 256); a vector far below the clip norm (here 5e-13 < the 1e-12 guard
    against a zero norm) is scaled by 1, not flipped or blown up."""
    v = torch.zeros(257, 2, dtype=torch.bfloat16)
    v[:, 0] = 1.0
    assert clipped_noisy_mean(v, clip=2.0, sigma=0.0).tolist() == [1.0, 0.0]
    tiny = clipped_noisy_mean(torch.tensor([[5e-13, 0.0]], dtype=torch.float64), clip=1.0, sigma=0.0)
    torch.testing.assert_close(tiny, torch.tensor([5e-13, 0.0]), rtol=1e-6, atol=0.0)


def test_a_release_refuses_the_ledger_of_another_client(tmp_path: Path,
                                                        fake_calibration: list[tuple[Any, ...]]) -> None:
    from fedpeft.privacy.ledger import LedgerConflict

    path = tmp_path / "client-7.json"
    Ledger("8", 6.0, DELTA).save(path)
    with pytest.raises(LedgerConflict, match="belongs to client '8', not '7'"):
        _release(path, np.ones(3, np.float32))
    assert Ledger.from_json(path.read_text()).entries == []


def test_a_new_ledger_of_a_release_keeps_the_accountant_asked(tmp_path: Path,
                                                              fake_calibration: list[tuple[Any, ...]]) -> None:
    ledger = _release(tmp_path / "client-7.json", np.ones(3, np.float32), relation="add-remove", accountant="rdp")
    assert ledger.accountant == "rdp" and ledger.entries[0].accountant == "rdp"
    assert fake_calibration[0][4] == "rdp"
    assert Ledger.from_json((tmp_path / "client-7.json").read_text()).accountant == "rdp"
