"""ICM-LoRA's server side: the CVAE's training pairs, generation and held-out evaluation.

Made by :meth:`fedpeft.adapters.icm_lora.plugin.IcmLoraPlugin.server_round_hook` and kept by the
server for the run; it reads the server only through a
:class:`~fedpeft.adapters.capabilities.ServerRoundContext`. Each
round every accepted reply gives one pair (its task vector, its B of every layer flattened in
layer-name order); pairs of the last ``snapshot_window`` rounds train a fresh
:class:`fedpeft.adapters.icm_lora.cvae.ConditionalVAE` (seeded: deterministic). Reported in ``metrics.jsonl``:

* ``icm_pairs`` (pairs used), ``icm_cvae_loss`` (final training loss, standardised units),
  ``icm_reconstruction_rel_error`` (relative error of B generated from each trained task's own
  task vector vs that task's aggregated B);
* with ``heldout_task``: ``icm_heldout_accuracy_generated`` / ``_unadapted`` /
  ``_nearest_adapter`` -- prototype-head accuracy on the held-out test split with the
  generated B, with B = 0, and with the B of the trained task whose task vector is most
  similar (cosine) -- plus ``icm_heldout_nearest_task`` and the task-vector cosines.

The held-out task is loaded like a run task (:func:`fedpeft.data.layout.load_task`) and split with
the run's seed at the index after the run's tasks: a class-balanced test split of
``data.test_size`` and a server-held labelled sample of ``tasks.public_size`` examples, from
which its task vector (clean: server-owned data) and the prototype heads are computed.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import torch
from torch.nn import functional as F

from fedpeft.adapters.capabilities import MetricsRow, RoundOutcome, ServerRoundContext
from fedpeft.adapters.icm_lora.cvae import ConditionalVAE, CVAEConfig
from fedpeft.adapters.icm_lora.layers import TV_MODULE, adapters_off, icm_layers, pooled_features
from fedpeft.adapters.icm_lora.options import IcmOptions
from fedpeft.config.tasks import TaskSpec
from fedpeft.data.layout import TASK_PREFIX, load_task
from fedpeft.data.sources import TextDataset, split_train_test

__all__ = ["IcmServer", "prototype_accuracy"]

log = logging.getLogger("fedpeft.server")


def prototype_accuracy(train_x: torch.Tensor, train_y: np.ndarray, test_x: torch.Tensor, test_y: np.ndarray) -> float:
    """Nearest class centroid (cosine) fitted on (train_x, train_y), accuracy on the test set."""
    tx, sx = F.normalize(train_x.float(), dim=1), F.normalize(test_x.float(), dim=1)
    labels = np.unique(train_y)
    cents = F.normalize(torch.stack([tx[torch.as_tensor(train_y == c)].mean(0) for c in labels]), dim=1)
    pred = labels[(sx @ cents.T).argmax(1).numpy()]
    return float(np.mean(pred == test_y))


class IcmServer:
    """Pairs memory, CVAE training and held-out evaluation for one run (see module doc)."""

    def __init__(self, ctx: ServerRoundContext, opts: IcmOptions) -> None:
        self.ctx, self.cfg = ctx, ctx.cfg
        self.heldout, self.window, self.steps = opts.heldout_task, opts.snapshot_window, opts.cvae_steps
        self.layers = [n for n, _ in icm_layers(ctx.model)]
        self.pairs: list[tuple[int, str, np.ndarray, np.ndarray]] = []  # (round, task, tv, flat B)
        self.test: TextDataset | None = None
        self.public: TextDataset | None = None
        self.heldout_tv: torch.Tensor | None = None
        self.unadapted: float | None = None
        if self.heldout:
            self._load_heldout()

    # ---- data -------------------------------------------------------------------------------
    def _load_heldout(self) -> None:
        data = load_task(TaskSpec(self.heldout))
        index = len(self.ctx.tasks)
        pool, self.test = split_train_test(data, self.cfg.data.test_size, self.cfg.seed * 7919 + index)
        self.public = pool.subset(np.arange(min(self.cfg.tasks.public_size, len(pool))))
        with adapters_off(self.ctx.model):
            feats = self._features(self.public)
        self.heldout_tv = F.normalize(feats, dim=1).mean(0)
        log.info("icm_lora: held-out task %s (%d classes): test %d, server-held labelled sample %d",
                 self.heldout, self.test.num_classes, len(self.test), len(self.public))

    def _features(self, data: TextDataset) -> torch.Tensor:
        return pooled_features(self.ctx.model, self.ctx.tokenizer, data.texts, self.cfg.model.max_length)

    # ---- pairs ------------------------------------------------------------------------------
    def flat_b(self, state: Mapping[str, np.ndarray], task: str) -> np.ndarray:
        return np.concatenate([np.asarray(state[f"{n}.{TASK_PREFIX}{task}.weight"], dtype=np.float32).ravel()
                               for n in self.layers])

    def unflatten(self, flat: np.ndarray) -> dict[str, torch.Tensor]:
        out, pos = {}, 0
        for name, layer in icm_layers(self.ctx.model):
            shape = layer.up(layer.active).weight.shape
            size = int(np.prod(shape))
            out[name] = torch.as_tensor(flat[pos:pos + size]).reshape(shape)
            pos += size
        return out

    def add_pairs(self, server_round: int, outcome: RoundOutcome) -> None:
        """One (task vector, flat B) pair per accepted reply of a released round; keep the
        pairs of the last ``snapshot_window`` rounds."""
        for reply in (outcome.accepted if outcome.released else []):
            tvs = [k for k in reply.state if k.startswith(f"{TV_MODULE}.{TASK_PREFIX}")]
            if len(tvs) != 1:
                continue
            task = tvs[0][len(f"{TV_MODULE}.{TASK_PREFIX}"):]
            self.pairs.append((server_round, task, np.asarray(reply.state[tvs[0]], dtype=np.float32),
                               self.flat_b(reply.state, task)))
        self.pairs = [p for p in self.pairs if p[0] > server_round - self.window]

    def fit(self) -> ConditionalVAE:
        c = torch.as_tensor(np.stack([p[2] for p in self.pairs]))
        y = torch.as_tensor(np.stack([p[3] for p in self.pairs]))
        cvae = ConditionalVAE(c.shape[1], y.shape[1], CVAEConfig(steps=self.steps, seed=self.cfg.seed))
        cvae.fit(c, y)
        return cvae

    # ---- evaluation -------------------------------------------------------------------------
    def _accuracy(self, b: dict[str, torch.Tensor] | None) -> float:
        """Prototype-head accuracy on the held-out test split with B = ``b`` (None: B = 0)."""
        assert self.test is not None and self.public is not None
        layers = dict(icm_layers(self.ctx.model))
        if b is None:
            with adapters_off(self.ctx.model):
                train_x, test_x = self._features(self.public), self._features(self.test)
        else:
            try:
                for name, layer in layers.items():
                    layer.override = b[name]
                train_x, test_x = self._features(self.public), self._features(self.test)
            finally:
                for layer in layers.values():
                    layer.override = None
        return prototype_accuracy(train_x, self.public.labels, test_x, self.test.labels)

    def round_end(self, server_round: int, outcome: RoundOutcome) -> MetricsRow:
        """Learn this round's pairs, fit the CVAE, report reconstruction and held-out results."""
        self.add_pairs(server_round, outcome)
        row: MetricsRow = {"icm_pairs": len(self.pairs), "icm_heldout_task": self.heldout or None}
        if not self.pairs:
            return row
        cvae = self.fit()
        row["icm_cvae_loss"] = cvae.last_loss
        state = self.ctx.state
        tvs = {t.name: np.asarray(state[f"{TV_MODULE}.{TASK_PREFIX}{t.name}"], dtype=np.float32) for t in self.ctx.tasks}
        trained = sorted({p[1] for p in self.pairs})
        errors = []
        for task in trained:
            target = self.flat_b(state, task)
            gen = cvae.generate(torch.as_tensor(tvs[task])).numpy()
            errors.append(float(np.linalg.norm(gen - target)) / max(float(np.linalg.norm(target)), 1e-12))
        row["icm_reconstruction_rel_error"] = float(np.mean(errors))
        if self.heldout and self.heldout_tv is not None:
            generated = cvae.generate(self.heldout_tv).numpy()
            cos = {t: float(F.cosine_similarity(torch.as_tensor(tvs[t]), self.heldout_tv, dim=0)) for t in trained}
            nearest = max(cos, key=lambda t: cos[t])
            if self.unadapted is None:
                self.unadapted = self._accuracy(None)
            row.update({
                "icm_heldout_accuracy_generated": self._accuracy(self.unflatten(generated)),
                "icm_heldout_accuracy_unadapted": self.unadapted,
                "icm_heldout_accuracy_nearest_adapter": self._accuracy(self.unflatten(self.flat_b(state, nearest))),
                "icm_heldout_nearest_task": nearest,
                "icm_heldout_tv_cosine": cos,
            })
            # read by the plugin's export (adapter_state.npz: heldout.*)
            self.ctx.model._icm_generated = {  # type: ignore[assignment]
                f"{k}.B": v for k, v in self.unflatten(generated).items()}
            log.info("round %d: icm_lora held-out %s: generated adapter %.4f vs un-adapted %.4f (nearest trained "
                     "task %s: %.4f)", server_round, self.heldout, row["icm_heldout_accuracy_generated"],
                     self.unadapted, nearest, row["icm_heldout_accuracy_nearest_adapter"])
        return row
