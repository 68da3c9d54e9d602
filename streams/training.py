"""Trainer logic: collect judged labels, run an incremental update, publish the next version.

Labels are written to the ledger as pending when they arrive, so the consumer may commit
their offsets at once and a crash loses none. After an update the new version's manifest
lists the label ids it consumed; the ledger marks them trained in the same step. On restart,
versions newer than the ledger knows are reconciled from their manifests, so no label is
trained twice.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

from actprm.model.checkpoints import CheckpointError, CheckpointStore, Manifest
from actprm.model.trainer import LabelledSample, Trainer, UpdateResult, load_trainable_state, trainable_state
from actprm.streams.ledger import META, PENDING, TRAINED, Ledger
from actprm.streams.messages import Label


@dataclass
class UpdateOutcome:
    result: UpdateResult
    manifest: Manifest | None  # the published version, None when nothing was published
    label_ids: list[str]
    error: str | None = None  # e.g. the checkpoint could not be written


class UpdateLoop:
    def __init__(self, trainer: Trainer, store: CheckpointStore, ledger: Ledger, batch_size: int, max_wait_s: float, min_batch: int = 1):
        self.trainer, self.store, self.ledger = trainer, store, ledger
        self.batch_size, self.max_wait_s, self.min_batch = batch_size, max_wait_s, min_batch
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
                    for label_id in self.store.manifest(v).consumed_label_ids:
                        self.ledger.put(TRAINED, label_id, v)
                        self.ledger.delete(PENDING, label_id)
            self.ledger.put(META, "trained_through", latest)
        self._follow(latest)
        return latest

    def _follow(self, version: int) -> None:
        _, tensors = self.store.load(version)
        load_trainable_state(self.trainer.prm, tensors)

    def receive(self, label: Label) -> bool:
        """Keep a label for the next update; False when its id was seen before."""
        if self.ledger.has(TRAINED, label.id) or self.ledger.has(PENDING, label.id):
            return False
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
        samples = [LabelledSample(l.id, l.problem, l.steps, l.first_error) for l in labels]
        result = self.trainer.update(samples)
        if not result.applied:
            # A rejected batch changes no weight; its labels are retired so they are not retried forever.
            self.rejected += 1
            with self.ledger.transaction():
                for label_id in ids:
                    self.ledger.put(TRAINED, label_id, None)
                    self.ledger.delete(PENDING, label_id)
            return UpdateOutcome(result, None, ids)
        prm = self.trainer.prm
        cfg = self.trainer.config
        fields = {"kind": "update", "parent": self.version, "mode": cfg.mode, "backbone": prm.backbone.reference(),
                  "prm": asdict(prm.config), "settings": cfg.model_dump(mode="json"), "consumed_label_ids": ids,
                  "metrics": {"loss": result.loss, "bce": result.bce, "grad_norm": result.grad_norm, "lr": result.lr,
                              "n_samples": result.n_samples, "n_labelled_steps": result.n_labelled_steps}}
        try:
            manifest = self.store.save(trainable_state(prm, cfg.mode), fields)
        except CheckpointError as err:
            # Serving goes on with the last version; the labels stay pending for the next try.
            self._follow(self.version)
            return UpdateOutcome(result, None, ids, error=str(err))
        with self.ledger.transaction():
            for label_id in ids:
                self.ledger.put(TRAINED, label_id, manifest.version)
                self.ledger.delete(PENDING, label_id)
            self.ledger.put(META, "trained_through", manifest.version)
        self.version = manifest.version
        return UpdateOutcome(result, manifest, ids)
