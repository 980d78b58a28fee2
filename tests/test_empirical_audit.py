"""One-run empirical audit (src/fedpeft/sim/audit): the bound, a correct run, and its power.

The bound is checked against hand-computable cases and against a literal transcription of
the paper's Appendix D algorithm; the canary audit must stay below the accounted epsilon on
fedpeft's real DP path and must exceed it when the mechanism is broken (too little noise,
or noise the server can regenerate).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from fedpeft.privacy.randomness import NodeSecret, RoundRandomness
from fedpeft.sim.audit import Mechanism, epsilon_lower_bound, guess_from_scores, p_value, run_empirical_audit


def _paper_p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """Steinke et al. (2023), Appendix D, transcribed loop by loop."""
    q = 1 / (1 + math.exp(-eps))
    beta = stats.binom.sf(v - 1, r, q)
    alpha, total = 0.0, 0.0
    for i in range(1, v + 1):
        total += stats.binom.pmf(v - i, r, q)
        if total > i * alpha:
            alpha = total / i
    return min(beta + alpha * delta * 2 * m, 1.0)


@pytest.mark.parametrize(("m", "r", "v", "eps", "delta"), [
    (1000, 100, 90, 1.0, 1e-5), (1000, 100, 100, 3.0, 1e-5), (200, 200, 150, 0.5, 1e-3), (50, 10, 0, 0.0, 0.1),
])
def test_p_value_is_the_papers_algorithm(m: int, r: int, v: int, eps: float, delta: float) -> None:
    assert p_value(m, r, v, eps, delta) == pytest.approx(_paper_p_value(m, r, v, eps, delta), rel=1e-9, abs=1e-15)


def test_bound_hand_checkable_cases() -> None:
    # delta = 0, all r guesses correct: p-value p(eps)^r = beta  =>  eps = logit(beta^(1/r)).
    for r in (20, 100, 1000):
        expected = math.log(0.05 ** (1 / r) / (1 - 0.05 ** (1 / r)))
        assert epsilon_lower_bound(r, r, r, 0.0, 0.05) == pytest.approx(expected, rel=1e-5)
    assert epsilon_lower_bound(1000, 1000, 1000, 0.0, 0.05) > 5.8  # many correct guesses: large
    assert epsilon_lower_bound(1000, 1000, 500, 1e-5, 0.05) == 0.0  # half correct: nothing
    assert epsilon_lower_bound(1000, 1000, 530, 1e-5, 0.05) < 0.05  # a hair above chance: ~0
    assert epsilon_lower_bound(1000, 0, 0, 1e-5, 0.05) == 0.0
    # the delta term only ever weakens the bound; a huge delta explains everything
    b = [epsilon_lower_bound(1000, 100, 100, d, 0.05) for d in (0.0, 1e-6, 1e-4, 1e-3)]
    assert b == sorted(b, reverse=True) and b[0] > b[-1]
    assert epsilon_lower_bound(1000, 100, 100, 0.5, 0.05) == 0.0


def test_guesses_from_scores() -> None:
    gen = np.random.default_rng(0)
    included = gen.random(1000) < 0.5
    perfect = guess_from_scores(included.astype(float) + 0.01 * gen.random(1000), included, 1e-5)
    assert perfect.correct == perfect.guesses and perfect.epsilon > 3
    chance = guess_from_scores(gen.random(1000), included, 1e-5)
    assert chance.epsilon < 0.3


# ---- canary audits on fedpeft's own DP path (tiny BERT) -----------------------------------

@pytest.fixture(scope="module")
def setup(tiny_model_dir: Path):  # type: ignore[no-untyped-def]
    from fedpeft.data.sources import train_test_split_for
    from fedpeft.load import parse_config
    from fedpeft.tasks.model import load_tokenizer

    cfg = parse_config({"model.path": str(tiny_model_dir), "model.max_length": 24, "data.test_size": 64,
                        "train.batch_size": 8, "train.optimizer": "sgd", "train.lr": 0.1})
    pool, _ = train_test_split_for(cfg.data, cfg.seed)
    return cfg, pool, load_tokenizer(cfg.model)


def _audit(setup, claimed: float, trained: float | None = None, known: bool = False):  # type: ignore[no-untyped-def]
    from fedpeft.adapters import get
    from fedpeft.tasks.seq_cls import load_base_model

    cfg, pool, tok = setup
    plugin = get("ffa_lora")
    model = plugin.attach(load_base_model(cfg.model, pool.num_classes, head_seed=0), cfg)
    rng = RoundRandomness.derived(NodeSecret(b"\x07" * 32), "audit")  # fixed: the test is deterministic
    mech = Mechanism(claimed, 1 / 8, 16, cfg.privacy.clip, 1e-5, "pld", "replace-one", "test")
    return run_empirical_audit(model, plugin, tok, pool.subset(np.arange(64)), cfg, mech, canaries=1000, rng=rng,
                               audit_seed=1, trained_sigma=trained, known_noise=rng if known else None)


@pytest.mark.parametrize("sigma", [0.8, 2.0])
def test_correct_dp_run_stays_below_the_accounted_epsilon(setup, sigma: float) -> None:  # type: ignore[no-untyped-def]
    # sigma = 0.8: the audit sees the canaries (epsilon_emp > 0) yet stays below the accountant;
    # sigma = 2.0: accounted epsilon below the audit's reach, so a broken mechanism fails here.
    res = _audit(setup, claimed=sigma)
    assert res.epsilon_emp <= res.add_remove <= res.accounted and res.ok
    assert res.epsilon_emp > 0 or sigma > 1
    assert res.orthonormal and res.mechanism.sample_rate == 1 / 8


def test_too_little_noise_is_caught(setup) -> None:  # type: ignore[no-untyped-def]
    res = _audit(setup, claimed=2.0, trained=0.01)  # accounted as sigma = 2, trained with 0.01
    assert res.epsilon_emp > res.accounted and not res.ok


def test_noise_the_server_can_regenerate_is_caught(setup) -> None:  # type: ignore[no-untyped-def]
    res = _audit(setup, claimed=2.0, known=True)  # right sigma, but the "server" holds the noise key
    assert res.epsilon_emp > res.accounted and not res.ok


def test_cli_empirical_audit_of_a_run_dir(tiny_cfg, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    from fedpeft.cli.main import main as cli_main
    from fedpeft.config import config_to_toml
    from fedpeft.privacy.ledger import Ledger, LedgerEntry

    run = tmp_path / "run"
    (run / "ledger").mkdir(parents=True)
    # 96 examples in batches of 12: q = 1/8, 2 rounds x 8 steps at sigma 2 (the accountant's figure is cached)
    cfg = dataclasses.replace(tiny_cfg, train=dataclasses.replace(tiny_cfg.train, optimizer="sgd", batch_size=12))
    (run / "config.toml").write_text(config_to_toml(cfg), encoding="utf-8")
    ledger = Ledger(client="0", target_epsilon=cfg.privacy.epsilon, delta=1e-5, accountant="pld",
                    noise_multiplier=2.0, sample_rate=1 / 8, planned_steps=16,
                    entries=[LedgerEntry(1, 2.0, 1 / 8, 8, 0.0), LedgerEntry(2, 2.0, 1 / 8, 8, 0.0)])
    (run / "ledger" / "client-0.json").write_text(ledger.to_json(), encoding="utf-8")
    assert cli_main(["-q", "privacy", "audit", "--empirical", str(run), "--canaries", "200", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert "epsilon_emp >= " in out and "accounted epsilon = " in out and "example-level, replace-one" in out
    assert "m=200" in out and "correct=" in out and "seconds=" in out and "q=0.125 steps=16" in out
    assert cli_main(["-q", "privacy", "audit", "--empirical", str(tmp_path / "missing")]) == 2
