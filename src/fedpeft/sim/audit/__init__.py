"""Empirical privacy audit with one training run: a *lower* bound on epsilon from canaries.

``fedpeft privacy audit --empirical RUN_DIR|CONFIG``. Method: Steinke, Nasr & Jagielski,
"Privacy Auditing with One (1) Training Run" (NeurIPS 2023). ``m`` canaries are each
included with probability 1/2 in one client's training, the model is trained as usual
through fedpeft's own DP path (:func:`fedpeft.privacy.dpsgd.make_private`: CSPRNG Poisson batches,
Opacus clipping, :class:`~fedpeft.privacy.dpsgd.SecretNoise`), every canary is scored, the top
scores are guessed "in" and the bottom ones "out", and the number of correct guesses is
turned into the largest epsilon an (epsilon, delta)-DP mechanism could not explain at
confidence 1 - beta, delta term included (:mod:`fedpeft.sim.audit.bound`, their Thm 5.2).

Canaries: white-box gradient ("Dirac") canaries (:mod:`fedpeft.sim.audit.canaries`): fixed
orthonormal directions of norm C in the trainable-parameter space, injected as extra
per-sample gradient rows whenever their own Poisson coin (rate q) comes up, so Opacus clips,
sums and noises them like real examples. The score reads the released noisy gradient of
every step (the all-iterates threat model DP-SGD is accounted under).

What is compared. A canary is added or removed, so the experiment tests add/remove
neighbours; the verdict holds ``epsilon_emp`` to the add/remove figure of the same history
(PLD), which for the Poisson-subsampled Gaussian is below the replace-one figure the run
reports (also printed, with its unit, relation, delta and accountant). ``epsilon_emp`` above
it contradicts the accounting (or is the beta-probability false alarm).

Cost: the canaries add next to nothing to training (a (m, d) direction matrix, one
matrix-vector product per step); the audit costs one training run of the mechanism's steps
plus two PLD figures. Measured on 2 busy CPU cores: tiny BERT, 1000 canaries, 16 steps,
4-20 s; MiniLM + FFA-LoRA, 8 steps of 32, 81 s (docs/privacy-audit.md).

Limits. It is a lower bound, not an estimate: a pass proves nothing, a failure is a bug
(with probability >= 1 - beta). One run gives weak bounds: r guesses, all correct, give at
most about ln(r / ln(G / beta)) (G grid points), and small epsilons (< ~1) are hardly resolved.
White-box canaries audit the *mechanism* (clipping, noise, Poisson sampling, the scaling and
the accountant's sigma), not what a model memorises of input text. The audit trains its own
copy (the configured model on client 0's partition, or the ledger's client) with the run's
sigma, q, C and steps; it does not replay the federation.
"""

from __future__ import annotations

import json
import math
import secrets
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedpeft.privacy.accounting import epsilon_for
from fedpeft.privacy.randomness import RoundRandomness
from fedpeft.sim.audit.bound import DEFAULT_GRID, Guesses, epsilon_lower_bound, guess_from_scores, p_value
from fedpeft.sim.audit.canaries import CanaryRun, canary_scores, train_with_canaries

__all__ = ["DEFAULT_GRID", "CanaryRun", "EmpiricalAudit", "Guesses", "Mechanism", "audit_target",
           "canary_scores", "epsilon_lower_bound", "guess_from_scores", "p_value", "run_empirical_audit",
           "train_with_canaries"]

CANARY_RELATION = "add-remove"  # a canary is either in the dataset or not


@dataclass(frozen=True)
class Mechanism:
    """The DP-SGD mechanism a run claims: what the accountant was given."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    clip: float
    delta: float
    accountant: str
    relation: str
    source: str = ""  # where the figures came from (a ledger, a calibration)

    @property
    def history(self) -> list[tuple[float, float, int]]:
        return [(self.noise_multiplier, self.sample_rate, self.steps)]


@dataclass
class EmpiricalAudit:
    """Result of one canary audit, beside the accounted epsilon."""

    mechanism: Mechanism
    trained_sigma: float  # the sigma training actually used (== claimed unless a test breaks it)
    epsilon_emp: float
    guesses: Guesses
    accounted: float  # the run's figure: mechanism.relation, mechanism.accountant
    accounted_by: str
    add_remove: float  # same history under add/remove (PLD): what the canaries test
    canaries: int
    dimension: int
    orthonormal: bool
    score: str
    seconds: float
    training_seconds: float
    audit_seed: int
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.epsilon_emp <= self.add_remove and self.epsilon_emp <= self.accounted

    def lines(self) -> list[str]:
        m, g = self.mechanism, self.guesses
        conf = f"{1 - g.beta:.0%}"
        out = [
            "empirical privacy audit: one run (Steinke, Nasr & Jagielski 2023), white-box gradient canaries",
            f"mechanism: sigma={m.noise_multiplier:.4f} q={m.sample_rate:.6g} steps={m.steps} C={m.clip:g} "
            f"delta={m.delta:g} ({m.source}); trained with sigma={self.trained_sigma:.4f}",
            f"epsilon_emp >= {self.epsilon_emp:.4f}  (lower bound, confidence {conf}, one canary added/removed, "
            f"delta={m.delta:g})",
            f"accounted epsilon = {self.accounted:.4f}  (example-level, {m.relation}, delta={m.delta:g}, "
            f"{self.accounted_by}); add-remove: {self.add_remove:.4f} (pld)",
            f"canaries m={self.canaries} (d={self.dimension}, {'orthonormal' if self.orthonormal else 'random'}), "
            f"guesses={g.guesses} (top {g.k_pos} in, bottom {g.k_neg} out), correct={g.correct}, "
            f"score={self.score}, {g.grid_size} guess sizes (Bonferroni)",
            f"seconds={self.seconds:.1f} (training {self.training_seconds:.1f})",
            *self.notes,
            "audit: " + ("PASSED (not contradicted; a lower bound proves no upper bound)" if self.ok else
                         "FAILED: the empirical lower bound exceeds the accounted epsilon"),
        ]
        return out

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {"ok": self.ok, "guesses": asdict(self.guesses) | {"guesses": self.guesses.guesses}}


def run_empirical_audit(
    model, plugin, tokenizer, data, cfg, mechanism: Mechanism, *,  # type: ignore[no-untyped-def]
    canaries: int = 1000, beta: float = 0.05, rng: RoundRandomness | None = None, audit_seed: int | None = None,
    trained_sigma: float | None = None, known_noise: RoundRandomness | None = None, score: str = "llr",
    batch_size: int | None = None,
) -> EmpiricalAudit:
    """Train ``model`` with canaries under ``mechanism`` and bound epsilon from below.

    ``trained_sigma`` and ``known_noise`` exist to break the mechanism on purpose (tests:
    the audit must catch it). ``rng`` defaults to fresh OS keys, ``audit_seed`` to a random one.
    """
    start = time.perf_counter()
    rng = rng if rng is not None else RoundRandomness.fresh_keys()
    audit_seed = audit_seed if audit_seed is not None else secrets.randbits(63)
    sigma = mechanism.noise_multiplier if trained_sigma is None else trained_sigma
    run = train_with_canaries(model, plugin, tokenizer, data, cfg, noise_multiplier=sigma, steps=mechanism.steps,
                              canaries=canaries, rng=rng, audit_seed=audit_seed, batch_size=batch_size,
                              known_noise=known_noise)
    notes = []
    if abs(run.sample_rate - mechanism.sample_rate) > 1e-9 * mechanism.sample_rate:
        notes.append(f"note: the audit's loader samples at q={run.sample_rate:.6g}, not the run's "
                     f"{mechanism.sample_rate:.6g}; accounted for the audit's q")
        mechanism = Mechanism(mechanism.noise_multiplier, run.sample_rate, mechanism.steps, mechanism.clip,
                              mechanism.delta, mechanism.accountant, mechanism.relation, mechanism.source)
    guesses = guess_from_scores(canary_scores(run, mechanism.noise_multiplier, score), run.included,
                                mechanism.delta, beta)
    accounted, by = epsilon_for(mechanism.history, mechanism.delta, mechanism.accountant, mechanism.relation)
    add_remove, _ = epsilon_for(mechanism.history, mechanism.delta, "pld", CANARY_RELATION)
    return EmpiricalAudit(mechanism, sigma, guesses.epsilon, guesses, accounted, by, add_remove, canaries,
                          run.dimension, run.orthonormal, score, time.perf_counter() - start, run.seconds,
                          audit_seed, notes)


def _relation_of(accountant: str, given: str | None) -> str:
    from fedpeft.privacy.accounting import ADD_REMOVE_ONLY, DEFAULT_RELATION

    if given:
        return given
    return "add-remove" if accountant in ADD_REMOVE_ONLY else DEFAULT_RELATION


def _ledger_mechanism(path: Path, clip: float, steps: int | None) -> tuple[Mechanism, str]:
    raw = json.loads(path.read_text(encoding="utf-8"))
    entries = raw.get("entries", [])
    sigmas = {float(e["noise_multiplier"]) for e in entries} or {float(raw.get("noise_multiplier", 0.0))}
    rates = {float(e["sample_rate"]) for e in entries} or {float(raw.get("sample_rate", 0.0))}
    if len(sigmas) != 1 or len(rates) != 1:
        raise ValueError(f"{path.name}: the ledger changes sigma or q between rounds; the audit needs one mechanism")
    sigma, q = sigmas.pop(), rates.pop()
    if sigma <= 0 or not 0 < q <= 1:
        raise ValueError(f"{path.name}: no DP-SGD recorded (sigma={sigma}, q={q})")
    total = sum(int(e["steps"]) for e in entries) or int(raw.get("planned_steps", 0))
    accountant = str(raw.get("accountant", "pld"))
    mech = Mechanism(sigma, q, steps or total, clip, float(raw["delta"]), accountant,
                     _relation_of(accountant, raw.get("relation")), f"ledger {path.name}")
    return mech, str(raw.get("client", ""))


def audit_target(target: Path | str, *, canaries: int = 1000, beta: float = 0.05, steps: int | None = None,
                 score: str = "llr", audit_seed: int | None = None) -> EmpiricalAudit:
    """Audit the mechanism of a run directory (config.toml + ledger/) or of a config file.

    sigma, q, steps and delta come from the first ledger if there is one, else from the
    config (q and steps as a client of its size would plan them, sigma by
    :func:`fedpeft.privacy.accounting.calibrate_noise`). ``steps`` overrides the step count (cheaper
    audits; the accounted epsilon is then for that many steps).
    """
    from fedpeft.adapters import get
    from fedpeft.client.trainer import local_steps
    from fedpeft.config import load_config_file
    from fedpeft.data.partition import client_partition
    from fedpeft.load import parse_config
    from fedpeft.privacy.accounting import calibrate_noise
    from fedpeft.privacy.plan import sample_rate_for
    from fedpeft.tasks.registry import task_for

    path = Path(target)
    cfg = parse_config(load_config_file(path / "config.toml" if path.is_dir() else path))
    if not cfg.privacy.enabled:
        raise ValueError("the configuration has no DP-SGD (privacy.epsilon is off): nothing to audit")
    task_type = task_for(cfg)
    pool = task_type.task_layout(cfg)[0].pool  # the clients' pool (a validation split held out)
    ledgers = sorted((path / "ledger").glob("client-*.json")) if path.is_dir() else []
    partition = 0
    if ledgers:
        mech, client = _ledger_mechanism(ledgers[0], cfg.privacy.clip, steps)
        partition = int(client) if client.isdigit() and int(client) < cfg.train.clients else 0
        data = client_partition(pool, cfg.data, cfg.train.clients, partition, cfg.seed)
    else:
        data = client_partition(pool, cfg.data, cfg.train.clients, partition, cfg.seed)
        q = sample_rate_for(len(data), cfg.train.batch_size)
        planned = local_steps(cfg, len(data)) * cfg.train.rounds
        relation = _relation_of(cfg.privacy.accountant, getattr(cfg.privacy, "relation", None))
        cal = calibrate_noise(cfg.privacy.epsilon, cfg.privacy.delta, q, planned, cfg.privacy.accountant,
                              relation=relation)
        mech = Mechanism(cal.noise_multiplier, q, steps or planned, cfg.privacy.clip, cfg.privacy.delta,
                         cal.accountant, relation, f"calibrated for epsilon={cfg.privacy.epsilon:g} from the config")
    # the loader's batch is chosen so that 1 / len(loader) is the mechanism's q
    batches = round(1 / mech.sample_rate)
    batch = math.ceil(len(data) / batches)
    plugin = get(cfg.adapter.method)
    base = task_type.build_model(cfg.model, task_type.num_outputs(pool), head_seed=cfg.adapter.seed)
    model = plugin.attach(base, cfg)
    result = run_empirical_audit(model, plugin, task_type.load_tokenizer(cfg.model), data, cfg, mech, canaries=canaries,
                                 beta=beta, audit_seed=audit_seed, score=score, batch_size=batch)
    result.notes.insert(0, f"trained its own copy of {cfg.model.path or 'the configured model'} "
                           f"({cfg.adapter.method}) on client {partition}'s {len(data)} examples; "
                           "the federation is not replayed")
    return result
