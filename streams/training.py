"""Trainer logic: collect judged labels, run an incremental update, publish the next version.

An update is `Trainer.fit` on the oldest pending labels plus a replay sample of labels trained
before (the ReplayStore, durable and bounded). In heads mode each label's hidden states come
from the scorer of this process when it still holds them (FeatureMemo), else from one
backbone pass, and are kept in the replay store, so replay never runs the backbone.

Labels are written to the ledger as pending when they arrive, so the consumer may commit
their offsets at once and a crash loses none. After an update the new version's manifest
lists the label ids it consumed; the ledger marks them trained in the same step. On restart,
versions newer than the ledger knows are reconciled from their manifests, so no label is
trained twice.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import structlog
import torch

from actprm.model.backbone import memory_summary
from actprm.model.checkpoints import CheckpointError, CheckpointStore, Manifest
from actprm.model.replay import FeatureMemo, ReplayStore
from actprm.model.trainer import FitConfig, LabelledSample, Trainer, UpdateResult, load_trainable_state, trainable_state
from actprm.model.metrics import processbench_scores
from actprm.streams.ledger import CANARY, META, PENDING, TRAINED, Ledger, mark_trained
from actprm.streams.messages import Label

log = structlog.get_logger("actprm")


@dataclass
class UpdateOutcome:
    result: UpdateResult
    manifest: Manifest | None  # the published version, None when nothing was published
    label_ids: list[str]
    error: str | None = None  # e.g. the checkpoint could not be written
    rejected: str | None = None  # why the update was refused (non-finite loss, canary F1 drop)


class UpdateLoop:
    def __init__(self, trainer: Trainer, store: CheckpointStore, ledger: Ledger, batch_size: int, max_wait_s: float,
                 min_batch: int = 1, canary_size: int = 0, canary_tolerance: float = 0.05, keep_versions: int = 0,
                 fit: FitConfig | None = None, replay: ReplayStore | None = None, memo: FeatureMemo | None = None):
        self.trainer, self.store, self.ledger = trainer, store, ledger
        self.fit = fit or FitConfig(steps=1, replay_share=0.0)  # without a FitConfig: the one-step update
        self.replay, self.memo = replay, memo
        self.keep_versions = keep_versions
        self.batch_size, self.max_wait_s, self.min_batch = batch_size, max_wait_s, min_batch
        # The canary: the first labels judged are held back (never trained) to catch an update
        # that makes the model worse; it is kept in the ledger so a restart keeps the same set.
        self.canary_size, self.canary_tolerance = canary_size, canary_tolerance
        self.canary = [Label.model_validate(v) for _, v in ledger.items(CANARY)]
        self._canary_f1: dict[int, float] = {}  # version -> canary F1
        self.version = self._reconcile()
        self.rejected = 0

    def _reconcile(self) -> int:
        """Mark labels trained by versions the ledger has not recorded (a crash after save)."""
        known = self.ledger.get(META, "trained_through", -1)
        latest = self.store.latest()
        if latest is None:
            raise CheckpointError(f"no version in {self.store.root}; publish an initial version first")
        with self.ledger.transaction():
            for v in self.store.versions():
                if v > known:
                    mark_trained(self.ledger, self.store.manifest(v).consumed_label_ids, v)
            self.ledger.put(META, "trained_through", latest)
        self._follow(latest)
        return latest

    def _follow(self, version: int) -> None:
        _, tensors = self.store.load(version)
        load_trainable_state(self.trainer.prm, tensors)

    def receive(self, label: Label) -> bool:
        """Keep a label for the next update; False when its id was seen before."""
        if self.ledger.has(TRAINED, label.id) or self.ledger.has(PENDING, label.id) or self.ledger.has(CANARY, label.id):
            return False
        if len(self.canary) < self.canary_size:
            self.ledger.put(CANARY, label.id, label.model_dump(mode="json"))
            self.canary.append(label)
            return True
        self.ledger.put(PENDING, label.id, {"label": label.model_dump(mode="json"), "received": time.time()})
        return True

    def pending(self) -> list[tuple[str, dict]]:
        return sorted(self.ledger.items(PENDING), key=lambda kv: kv[1]["received"])

    def ready(self, now: float | None = None) -> bool:
        pending = self.pending()
        if len(pending) >= self.batch_size:
            return True
        if len(pending) < self.min_batch:
            return False
        return (now or time.time()) - pending[0][1]["received"] >= self.max_wait_s

    def update(self) -> UpdateOutcome:
        """One incremental update on the oldest pending labels (blocking: run it off the loop)."""
        latest = self.store.latest()
        if latest is not None and latest != self.version:
            self._follow(latest)  # e.g. an operator rolled back: continue from that version
            self.version = latest
        chosen = self.pending()[: self.batch_size]
        ids = [label_id for label_id, _ in chosen]
        labels = [Label.model_validate(item["label"]) for _, item in chosen]
        samples = [LabelledSample(l.id, l.problem, l.steps, l.first_error, self._known_features(l)) for l in labels]
        before = self.canary_f1(self.version)
        poisoned: list[str] = []  # labels whose own batch of one was refused: retired, not retried
        try:
            result, kept, poisoned = self._train(samples)
            refused = None if kept else result.reason
            ids = [s.id for s in kept] if kept else ids
        except torch.cuda.OutOfMemoryError:
            # The device's state, not the labels' fault: they stay pending and the update is
            # tried again after the runtime's backoff, while the served version goes on.
            self._follow(self.version)
            error = (f"CUDA out of memory during the update ({memory_summary(self.trainer.prm.device)}); "
                     f"v{self.version} keeps serving and the labels stay pending; lower trainer.micro_batch_size, "
                     f"set trainer.gradient_checkpointing or run the trainer on another GPU")
            return UpdateOutcome(UpdateResult(False, error), None, ids, error=error)
        except (RuntimeError, ValueError) as err:  # e.g. an overflow inside the optimizer step
            result = UpdateResult(False, f"update failed: {str(err).splitlines()[0]}")
            refused = result.reason
            self._follow(self.version)
        if refused is None and not all(torch.isfinite(t).all() for t in trainable_state(self.trainer.prm, self.trainer.config.mode).values()):
            refused = "the update made weights non-finite"
            self._follow(self.version)
        after = self.canary_f1(None) if refused is None else None
        if before is not None and after is not None and before - after > self.canary_tolerance:
            refused = f"canary F1 fell from {before:.3f} to {after:.3f} (tolerance {self.canary_tolerance:g})"
            self._follow(self.version)  # back to the weights that are serving
        if refused is not None:
            # A refused batch leaves the served weights as they were; its labels are retired so
            # they are not retried forever (their ids stay in the ledger as trained by no version).
            self.rejected += 1
            mark_trained(self.ledger, ids + poisoned, None)
            return UpdateOutcome(result, None, list(dict.fromkeys(ids + poisoned)), rejected=refused)
        prm = self.trainer.prm
        cfg = self.trainer.config
        fields = {"kind": "update", "parent": self.version, "mode": cfg.mode, "backbone": prm.backbone.reference(),
                  "prm": asdict(prm.config), "settings": cfg.model_dump(mode="json"), "consumed_label_ids": ids,
                  "metrics": {"loss": result.loss, "bce": result.bce, "grad_norm": result.grad_norm, "lr": result.lr,
                              "n_samples": result.n_samples, "n_labelled_steps": result.n_labelled_steps,
                              "canary_f1": after, "labels_new": len(ids), "labels_replayed": result.n_replayed,
                              "steps": result.steps}}
        try:
            manifest = self.store.save(trainable_state(prm, cfg.mode), fields)
        except CheckpointError as err:
            # Serving goes on with the last version; the labels stay pending for the next try
            # (all but poisoned ones, which would only be refused again).
            self._follow(self.version)
            mark_trained(self.ledger, poisoned, None)
            return UpdateOutcome(result, None, ids, error=str(err))
        with self.ledger.transaction():
            mark_trained(self.ledger, ids, manifest.version)
            mark_trained(self.ledger, poisoned, None)
            self.ledger.put(META, "trained_through", manifest.version)
        self.version = manifest.version
        if after is not None:
            self._canary_f1[manifest.version] = after
        if self.replay is not None:
            try:
                trained = set(ids)
                self.replay.add([s for s in samples if s.id in trained])
            except OSError as err:  # replay is an aid to learning: the update itself has succeeded
                log.warning("could not keep labels for replay", error=str(err))
        try:
            self.store.prune(self.keep_versions)
        except OSError as err:  # retention is housekeeping: the update itself has succeeded
            log.warning("could not prune old checkpoint weights", error=str(err))
        return UpdateOutcome(result, manifest, ids)

    def _train(self, samples: list[LabelledSample]) -> tuple[UpdateResult, list[LabelledSample], list[str]]:
        """Step on the samples; a batch refused as non-finite is split in halves and each half
        tried again, so one poisoned label cannot take good ones down with it.

        Returns the last step's result, the samples trained on, and the ids refused alone."""
        replay = self.replay.samples() if self.replay is not None else []
        result = self.trainer.fit(samples, replay, self.fit)
        if result.applied:
            return result, list(samples), []
        if len(samples) == 1:
            return result, [], [samples[0].id]
        mid = len(samples) // 2
        first, kept_a, bad_a = self._train(samples[:mid])
        second, kept_b, bad_b = self._train(samples[mid:])
        last = second if second.applied or not first.applied else first
        return last, kept_a + kept_b, bad_a + bad_b

    def _known_features(self, label: Label):
        """The hidden states this process's scorer computed for the label's trajectory, if any
        (heads mode only: with a backbone that trains they go stale)."""
        if self.memo is None or self.trainer.config.mode != "heads":
            return None
        return self.memo.take(label.id, label.problem, label.steps)

    def canary_f1(self, version: int | None) -> float | None:
        """ProcessBench F1 of the trainer's current weights on the canary (None when it is not full yet).

        `version` names the weights when they are a stored version, so the figure is reused."""
        if self.canary_size == 0 or len(self.canary) < self.canary_size:
            return None
        if version is not None and version in self._canary_f1:
            return self._canary_f1[version]
        scores = self.trainer.prm.score([(l.problem, l.steps) for l in self.canary])
        f1 = processbench_scores([s.first_error for s in scores], [l.first_error for l in self.canary])["f1"]
        if version is not None:
            self._canary_f1[version] = f1
        return f1
