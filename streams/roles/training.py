"""The trainer: collect judged labels, run an incremental update, publish the next version.

`TrainerRole` is what the labels agent calls; its update loop (`run_updates`, an app task that
arriving labels wake) starts each update. `UpdateLoop` is the update itself (blocking torch
work, run on the trainer's own thread).

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

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from itertools import islice

import structlog
import torch

from actprm.model.backbone import memory_summary
from actprm.model.training.checkpoints import CheckpointError, CheckpointStore, Manifest
from actprm.model.training.consolidate import ConsolidateConfig, Figures, in_validation, validation_figures
from actprm.model.training.replay import FeatureMemo, ReplayStore
from actprm.model.training.trainer import (FitConfig, LabelledSample, Trainer, UpdateResult, averaged_state, reading,
                                          trainable_state)
from actprm.model.eval.metrics import processbench_scores
from actprm.model.eval.prequential import OnlineWindow, score_label
from actprm.client import messages
from actprm.streams.config import ConsolidateSettings
from actprm.streams.roles.consolidation import Consolidator
from actprm.streams.state.journal import Journal
from actprm.streams.state.ledger import CANARY, META, PENDING, TRAINED, VALIDATED, Ledger, mark_trained
from actprm.client.messages import Label, ModelVersion
from actprm.streams.roles.rounds import RoundKeeper
from actprm.streams.roles.swap import Serving
from actprm.streams.kafka.sender import Event, LastError, Sender
from actprm.streams.state.series import KeepFirstAndLast
from actprm.client.topics import Topics

log = structlog.get_logger("actprm")

LABELS_FROM_ROUND = "labels_from_round"  # META key: labels of rounds before it are dropped (reset-round)


@dataclass
class UpdateOutcome:
    result: UpdateResult
    manifest: Manifest | None  # the published version, None when nothing was published
    label_ids: list[str]
    error: str | None = None  # e.g. the checkpoint could not be written
    rejected: str | None = None  # why the update was refused (non-finite loss, canary F1 drop)
    validation_only: bool = False  # every label was of the validation slice: kept for it, no version


class UpdateLoop:
    def __init__(self, trainer: Trainer, store: CheckpointStore, ledger: Ledger, batch_size: int, max_wait_s: float,
                 min_batch: int = 1, canary_size: int = 0, canary_tolerance: float = 0.05, keep_versions: int = 0,
                 fit: FitConfig | None = None, replay: ReplayStore | None = None, memo: FeatureMemo | None = None,
                 validation: ConsolidateConfig | None = None, serve_average: float = 0.0):
        self.trainer, self.store, self.ledger = trainer, store, ledger
        # Each version serves this share of the last one's weights and the rest of the newly
        # trained ones; training goes on from the trained weights (which only this process
        # holds). What the version serves (self._served) restarts from a stored version wherever
        # the trainer takes one up: at start, after a rollback, a consolidation.
        self.serve_average = serve_average
        self._served: dict[str, torch.Tensor] | None = None
        self.fit = fit or FitConfig(steps=1, replay_share=0.0)  # without a FitConfig: the one-step update
        self.replay, self.memo = replay, memo
        self.keep_versions = keep_versions
        self.batch_size, self.max_wait_s, self.min_batch = batch_size, max_wait_s, min_batch
        # The canary: the first labels judged are held back (never trained) to catch an update
        # that makes the model worse; it is kept in the ledger so a restart keeps the same set.
        self.canary_size, self.canary_tolerance = canary_size, canary_tolerance
        self.canary = [Label.model_validate(v) for _, v in ledger.items(CANARY)]
        self._canary_f1: dict[int, float] = KeepFirstAndLast(8)  # version -> canary F1 (v0 and the newest 8: bounded)
        self.version = self._reconcile()
        # The pending labels in order of arrival (label id -> the ledger's value): the ledger is
        # the durable copy, written first; this copy is read once here, so pending() and ready()
        # never read or decode the ledger. Labels arrive on the event loop and leave on the
        # training thread, hence the lock.
        self._pending: dict[str, dict] = dict(sorted(ledger.items(PENDING), key=lambda kv: kv[1]["received"]))
        self._pending_lock = threading.Lock()
        self.rejected = 0
        # The consolidation settings (read live) when consolidations run: their validation slice
        # is kept out of the online updates too (held_out), so the served version is never
        # compared with a candidate on labels it learnt (streams/roles/consolidation.py).
        self.validation = validation
        # Slice labels that have judged a consolidation (consolidate.validate_once): they train
        # from then on. Kept in the ledger while the replay store keeps them, so a restart keeps them.
        self.validated: frozenset[str] = frozenset(k for k, _ in ledger.items(VALIDATED))

    def _reconcile(self) -> int:
        """Mark labels trained by versions the ledger has not recorded (a crash after save)."""
        known = self.ledger.get(META, "trained_through", -1)
        latest = self.store.latest()
        if latest is None:
            raise CheckpointError(f"no version in {self.store.root}; publish an initial version first")
        with self.ledger.transaction():
            for v in self.store.versions(since=known + 1):  # only those after the ledger's mark
                if v > known:
                    mark_trained(self.ledger, self.store.manifest(v).consumed_label_ids, v)
            self.ledger.put(META, "trained_through", latest)
        self._follow(latest)
        return latest

    def _follow(self, version: int) -> None:
        """Continue from a stored version other than the weights in memory (at start, after an
        operator's rollback or another writer's version). Trainer.load resets the optimizer's
        moments, which belong to the weights left behind, and keeps the step (the lr schedule).
        A refused update is undone with Trainer.restore instead, never from disk."""
        _, tensors = self.store.load(version)
        self.take_up(tensors)

    def take_up(self, state: dict[str, torch.Tensor]) -> None:
        """Train on from these weights, which a version serves (the average starts again)."""
        self.trainer.load(state)
        self._served = state if self.serve_average > 0 else None

    def served_state(self) -> dict[str, torch.Tensor]:
        """The weights of the version serving (self.version), which may differ from the
        trainer's when updates are averaged."""
        if self._served is not None:
            return self._served
        return trainable_state(self.trainer.prm, self.trainer.config.mode)

    def served_figures(self, val: Sequence[LabelledSample]) -> Figures:
        """validation_figures of the version serving (the trainer's weights are put back)."""
        if self._served is None:
            return validation_figures(self.trainer.prm, val)
        with reading(self.trainer.prm, self._served) as prm:
            return validation_figures(prm, val)

    def held_out(self, label_id: str) -> bool:
        """Is this label in the consolidations' validation slice, not yet judged on (not trained online)?"""
        return (self.validation is not None and in_validation(label_id, self.validation.val_fraction)
                and label_id not in self.validated)

    def validated_once(self, label_ids: Sequence[str], version: int | None) -> None:
        """These slice labels have judged a consolidation (`version`, None when refused): they train
        from now on. Ids the replay store no longer keeps are dropped, so the set stays bounded."""
        gone = [i for i in self.validated if self.replay is None or i not in self.replay]
        with self.ledger.transaction():
            for label_id in label_ids:
                self.ledger.put(VALIDATED, label_id, version)
            for label_id in gone:
                self.ledger.delete(VALIDATED, label_id)
        # one assignment: the event loop reads the set (in_stream_sample) while this thread writes it
        self.validated = (self.validated | frozenset(label_ids)) - frozenset(gone)

    def receive(self, label: Label) -> bool:
        """Keep a label for the next update; False when its id was seen before."""
        return self.receive_many([label])[0]

    def receive_many(self, labels: Sequence[Label]) -> list[bool]:
        """Keep labels for the next updates in one ledger write; False for each id seen before.
        They join the in-memory pending set only once that write has landed: an update on the
        training thread never takes a label the ledger does not hold yet."""
        kept, seen, items = [], set(), {}
        with self.ledger.transaction():
            for label in labels:
                new = (label.id not in seen and label.id not in self._pending and not self.ledger.has(TRAINED, label.id)
                       and not self.ledger.has(CANARY, label.id))
                seen.add(label.id)
                kept.append(new)
                if not new:
                    continue
                if len(self.canary) < self.canary_size:
                    self.ledger.put(CANARY, label.id, label.model_dump(mode="json"))
                    self.canary.append(label)
                    continue
                items[label.id] = {"label": label.model_dump(mode="json"), "received": time.time()}
                self.ledger.put(PENDING, label.id, items[label.id])  # the durable copy first
        with self._pending_lock:
            self._pending.update(items)
        return kept

    def pending(self, limit: int | None = None) -> list[tuple[str, dict]]:
        """The pending labels, oldest first (the first `limit`), as (label id, ledger value)."""
        with self._pending_lock:
            return list(islice(self._pending.items(), limit))

    @property
    def n_pending(self) -> int:
        return len(self._pending)

    def retire(self, label_ids: Sequence[str]) -> None:
        """Labels leave the pending set untrained (trained by no version: ledger.mark_trained).
        Inside an open ledger transaction, mark them there and forget() them once it has landed."""
        mark_trained(self.ledger, label_ids, None)
        self.forget(label_ids)

    def forget(self, label_ids: Sequence[str]) -> None:
        """Drop labels from the in-memory pending set, after the ledger has marked them trained."""
        with self._pending_lock:
            for label_id in label_ids:
                self._pending.pop(label_id, None)

    def ready(self, now: float | None = None) -> bool:
        with self._pending_lock:
            n = len(self._pending)
            oldest = next(iter(self._pending.values()), None)
        if n >= self.batch_size:
            return True
        if n < self.min_batch or oldest is None:
            return False
        return (now or time.time()) - oldest["received"] >= self.max_wait_s

    def update(self) -> UpdateOutcome:
        """One incremental update on the oldest pending labels (blocking: run it off the loop)."""
        latest = self.store.latest()
        if latest is not None and latest != self.version:
            self._follow(latest)  # e.g. an operator rolled back: continue from that version
            self.version = latest
        chosen = self.pending(self.batch_size)
        ids = [label_id for label_id, _ in chosen]
        labels = [Label.model_validate(item["label"]) for _, item in chosen]
        samples = [LabelledSample(l.id, l.problem, l.steps, l.first_error, self._known_features(l)) for l in labels]
        before = self.canary_f1(self.version)
        poisoned: list[str] = []  # labels whose own batch of one was refused: retired, not retried
        held = [s for s in samples if self.held_out(s.id)]
        if len(held) == len(samples):
            return self._keep_for_validation(ids, samples)
        undo = self.trainer.snapshot()  # every refusal below goes back to it: weights, optimizer moments, step
        try:
            trainable = [s for s in samples if not any(s is h for h in held)]
            result, kept, poisoned = self._train(trainable)
            kept += held if kept else []  # held out: kept for validation, consumed once
            refused = None if kept else result.reason
            ids = [s.id for s in kept] if kept else ids
        except torch.cuda.OutOfMemoryError:
            # The device's state, not the labels' fault: they stay pending and the update is
            # tried again after the trainer role's backoff, while the served version goes on.
            self.trainer.restore(undo)
            error = (f"CUDA out of memory during the update ({memory_summary(self.trainer.prm.device)}); "
                     f"v{self.version} keeps serving and the labels stay pending; lower trainer.micro_batch_size, "
                     f"set trainer.gradient_checkpointing or run the trainer on another GPU")
            return UpdateOutcome(UpdateResult(False, error), None, ids, error=error)
        except (RuntimeError, ValueError) as err:  # e.g. an overflow inside the optimizer step
            result = UpdateResult(False, f"update failed: {str(err).splitlines()[0]}")
            refused = result.reason
            self.trainer.restore(undo)
        if refused is None and not all(torch.isfinite(t).all() for t in trainable_state(self.trainer.prm, self.trainer.config.mode).values()):
            refused = "the update made weights non-finite"
            self.trainer.restore(undo)
        after = self.canary_f1(None) if refused is None else None
        if before is not None and after is not None and before - after > self.canary_tolerance:
            refused = f"canary F1 fell from {before:.3f} to {after:.3f} (tolerance {self.canary_tolerance:g})"
            self.trainer.restore(undo)  # back to the weights that are serving
        if refused is not None:
            # A refused batch leaves the served weights as they were; its labels are retired so
            # they are not retried forever (their ids stay in the ledger as trained by no version).
            self.rejected += 1
            self.retire(ids + poisoned)
            return UpdateOutcome(result, None, list(dict.fromkeys(ids + poisoned)), rejected=refused)
        prm = self.trainer.prm
        cfg = self.trainer.config
        fields = {"kind": "update", "parent": self.version, "mode": cfg.mode, "backbone": prm.backbone.reference(),
                  "prm": asdict(prm.config), "settings": cfg.model_dump(mode="json"), "consumed_label_ids": ids,
                  "metrics": {"loss": result.loss, "bce": result.bce, "grad_norm": result.grad_norm, "lr": result.lr,
                              "n_samples": result.n_samples, "n_labelled_steps": result.n_labelled_steps,
                              "canary_f1": after, "labels_new": len(ids), "labels_replayed": result.n_replayed,
                              "steps": result.steps, "serve_average": self.serve_average}}
        served = trainable_state(prm, cfg.mode)
        if self._served is not None:
            served = averaged_state(self._served, served, self.serve_average, self.trainer.trained_names())
        try:
            manifest = self.store.save(served, fields)
        except CheckpointError as err:
            # Serving goes on with the last version; the labels stay pending for the next try
            # (all but poisoned ones, which would only be refused again).
            self.trainer.restore(undo)
            self.retire(poisoned)
            return UpdateOutcome(result, None, ids, error=str(err))
        with self.ledger.transaction():
            mark_trained(self.ledger, ids, manifest.version)
            mark_trained(self.ledger, poisoned, None)
            self.ledger.put(META, "trained_through", manifest.version)
        self.forget(ids + poisoned)
        self.version = manifest.version
        if self._served is not None:
            self._served = served
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

    def _keep_for_validation(self, ids: list[str], samples: list[LabelledSample]) -> UpdateOutcome:
        """A batch of validation labels alone (the stream's sample often is, once the rule
        selects little): nothing to train, so no version; they are kept for the consolidations
        and consumed once, by no version."""
        with self.ledger.transaction():
            mark_trained(self.ledger, ids, None)
        self.forget(ids)
        if self.replay is not None:
            try:
                self.replay.add(samples)
            except OSError as err:
                log.warning("could not keep labels for validation", error=str(err))
        return UpdateOutcome(UpdateResult(False, "validation labels only"), None, ids, validation_only=True)

    def _train(self, samples: list[LabelledSample]) -> tuple[UpdateResult, list[LabelledSample], list[str]]:
        """Step on the samples; a batch refused as non-finite is split in halves and each half
        tried again, so one poisoned label cannot take good ones down with it.

        Returns the last step's result, the samples trained on, and the ids refused alone."""
        replay = self.replay.samples() if self.replay is not None else []
        replay = [s for s in replay if not self.held_out(s.id)]
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


class TrainerRole:
    """The single writer of versions: takes labels, updates when enough are pending, publishes."""

    def __init__(self, updates: UpdateLoop, rounds: RoundKeeper, sender: Sender, topics: Topics, journal: Journal,
                 errors: LastError, online_window: int, serving: Serving | None = None,
                 consolidate: ConsolidateSettings | None = None):
        self.updates, self.rounds, self.sender, self.topics, self.journal = updates, rounds, sender, topics, journal
        self.errors = errors
        self.ledger, self.store = updates.ledger, updates.store
        self.serving = serving  # a scorer's in this process: it switches at once, without waiting for the announcement
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="actprm-train")  # updates, rollbacks, retiring labels
        # candidates trained on all labels kept, beside this loop (streams/roles/consolidation.py)
        self.consolidator = Consolidator(updates, consolidate, self.pool) if consolidate is not None else None
        self._consolidation: asyncio.Task | None = None
        self.online = OnlineWindow(online_window)  # each label tests the version that scored it
        # The same test on the stream's validation sample alone (consolidate.val_sample = "stream"):
        # the online window is mostly the hard cases the rule selected; this one is the stream.
        self.sample = OnlineWindow(online_window)
        self.counts: Counter = Counter()
        self.updating = False
        self._retry_at = 0.0  # after a failed write, the next try waits (backoff)
        self._failures_in_row = 0
        self._wake = asyncio.Event()  # set by what may make an update due (see run_updates)

    # --- labels ----------------------------------------------------------------------------

    async def on_labels(self, events: Sequence[Event]) -> None:
        labels = [msg for _, msg in await self.sender.decoded(Label, events)]
        current = [label for label in labels if self.accepts(label)]
        self.counts["labels_stale_round"] += len(labels) - len(current)  # their round was reset without --keep-pending
        for label, new in zip(current, self.updates.receive_many(current)):  # one ledger write for the take
            if new:
                self.counts["labels_received"] += 1
                self._test_label(label)
            else:
                self.counts["labels_duplicate"] += 1
        self.wake()

    def accepts(self, label: Label) -> bool:
        """False for a label of a round closed by `reset-round` without --keep-pending (drop it)."""
        return label.round_id >= self.ledger.get(META, LABELS_FROM_ROUND, 0)

    def _test_label(self, label: Label) -> None:
        """Prequential evaluation: the label first tests the version that asked for it."""
        test = score_label(label.mu, label.first_error, label.n_steps, label.scored_version) if label.mu is not None else None
        if test is not None:
            self.online.add(test)
            if self.in_stream_sample(label.id):
                self.sample.add(test)
        self.journal.append("labels", {
            "id": label.id, "judged_at": label.judged_at, "round_id": label.round_id, "version": label.scored_version,
            "first_error": label.first_error, "predicted_first_error": test.predicted if test else None,
            "mu": label.mu, "n_steps": label.n_steps, "metadata": label.metadata})

    def in_stream_sample(self, label_id: str) -> bool:
        """Was this label's trajectory judged as part of the stream's validation sample?"""
        c = self.consolidator.config if self.consolidator is not None else None
        return c is not None and c.stream_sample() is not None and self.updates.held_out(label_id)

    async def drop_pending_before(self, round_id: int) -> int:
        """Retire labels of earlier rounds that wait for training (as a rejected batch's are), and
        drop such labels from now on. On the training thread: no update reads them meanwhile."""
        def retire() -> int:
            stale = [label_id for label_id, item in self.updates.pending() if item["label"]["round_id"] < round_id]
            with self.ledger.transaction():
                mark_trained(self.ledger, stale, None)
                self.ledger.put(META, LABELS_FROM_ROUND, round_id)
            self.updates.forget(stale)
            return len(stale)

        return await asyncio.get_running_loop().run_in_executor(self.pool, retire)

    # --- updates ---------------------------------------------------------------------------

    def wake(self) -> None:
        """Something may have made an update due: labels arrived, training resumed, update.* was set."""
        self._wake.set()

    async def run_updates(self) -> None:
        """The trainer's update loop (an app task): it sleeps until woken or until the oldest pending
        label's wait (update.max_wait_s) or a failed write's backoff runs out; it never polls."""
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self._seconds_to_due())
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                await self.maybe_update()
            except Exception as err:  # noqa: BLE001  (the loop must go on; the error is reported)
                self.errors.note(f"update: {type(err).__name__}: {err}"[:300])
                log.exception("update failed")

    def _seconds_to_due(self) -> float | None:
        """How long until an update is due with no new event; None: only an event can make one due."""
        u = self.updates
        if self.updating or self.rounds.state.paused_train or u.n_pending < u.min_batch:
            return None  # an update under way wakes the loop when it ends
        backoff = max(0.0, self._retry_at - time.monotonic())
        if u.n_pending >= u.batch_size:
            return backoff
        oldest = u.pending(1)[0][1]["received"]
        return max(backoff, oldest + u.max_wait_s - time.time())

    async def maybe_update(self, force: bool = False) -> None:
        if self.updating or self.rounds.state.paused_train or time.monotonic() < self._retry_at:
            return
        if not (self.updates.ready() or (force and self.updates.n_pending)):
            return
        self.updating = True
        try:
            outcome = await asyncio.get_running_loop().run_in_executor(self.pool, self.updates.update)
        finally:
            self.updating = False
            self.wake()  # the update loop looks again: more labels may be due
        r, published = outcome.result, outcome.manifest
        if outcome.validation_only:
            self.counts["labels_validation_only"] += len(outcome.label_ids)
            return
        self.journal.append("updates", {
            "version": published.version if published else None,
            "parent": published.parent if published else self.updates.version,
            "refused": outcome.rejected, "error": outcome.error,
            "loss": r.loss if r.applied else None, "labels_new": len(outcome.label_ids), "labels_replayed": r.n_replayed,
            "steps": r.steps})
        if outcome.error:
            # e.g. a full disk: each try costs a gradient step, so back off 1, 2, 4 ... 60 s.
            self._failures_in_row += 1
            self._retry_at = time.monotonic() + min(60.0, 2.0 ** (self._failures_in_row - 1))
            self.counts["update_failures"] += 1
            self.errors.note(outcome.error)
            log.error("update failed; serving continues", reason=outcome.error)
        elif published is None:
            self.counts["updates_rejected"] += 1
            self.errors.note(f"update rejected: {outcome.rejected}")
            log.warning("update rejected; the served version stays", reason=outcome.rejected, labels=len(outcome.label_ids))
        else:
            self._failures_in_row = 0
            self.counts["updates"] += 1
            self.counts["labels_trained"] += len(outcome.label_ids)
            self.counts["labels_replayed"] += r.n_replayed
            await self.publish(published)
            log.info("published", version=published.version, loss=round(r.loss, 4), labels=len(outcome.label_ids))
            if self.consolidator is not None and self.consolidator.due(len(outcome.label_ids)):
                self.consolidate("every_labels")

    # --- consolidations (streams/roles/consolidation.py) ------------------------------------------

    def consolidate(self, reason: str, config: ConsolidateConfig | None = None) -> str:
        """Start a consolidation beside the online loop; its outcome is journalled and published later.
        config: how it trains (default: the `consolidate` settings)."""
        if self.consolidator is None:
            raise RuntimeError("consolidation is not set up in this trainer")
        self.consolidator.begin()  # raises when one is running
        self._consolidation = asyncio.get_running_loop().create_task(
            self.consolidator.run(reason, self._consolidated, config))
        n = len(self.updates.replay) if self.updates.replay is not None else 0
        return f"consolidation started on the {n} labels kept (served version {self.updates.version})"

    async def _consolidated(self, outcome) -> None:
        rec, m = outcome.record, outcome.manifest
        self.journal.append("updates", {
            "kind": "consolidate", "version": m.version if m else None, "parent": m.parent if m else rec.get("served_version"),
            "refused": outcome.refused, "error": outcome.error, "loss": rec.get("val_loss"), "labels_new": 0,
            "labels_replayed": rec.get("labels", 0), "steps": rec.get("steps", 0), "consolidation": rec})
        if m is None:
            self.counts["consolidations_refused" if outcome.refused else "consolidation_failures"] += 1
            log.info("consolidation not published; the served version stays", refused=outcome.refused, error=outcome.error)
            return
        self.counts["consolidations"] += 1
        await self.publish(m)
        log.info("published a consolidation", version=m.version, val_f1=rec["val_f1"], served_val_f1=rec["served_val_f1"],
                 labels=rec["labels"], epochs=rec["epochs"])

    async def rollback(self, version: int | None) -> Manifest:
        """Publish a new version with the weights of `version`; training continues from it."""
        loop = asyncio.get_running_loop()
        exists = version is not None and await loop.run_in_executor(self.pool, self.store.has, version)  # maybe NFS
        if not exists:
            latest = await loop.run_in_executor(self.pool, self.store.latest)
            raise ValueError(f"version {version} does not exist (have 0..{latest})" if latest is not None
                             else f"version {version} does not exist (no versions yet)")
        # The training thread: never while an update writes, and the next update starts from it.
        manifest = await loop.run_in_executor(self.pool, self.store.rollback, version)
        await self.publish(manifest)
        return manifest

    async def publish(self, m: Manifest) -> None:
        """Announce a stored version (update or rollback); a scorer in this process switches to it at once."""
        announce = ModelVersion(version=m.version, location=str(self.store.root), parent=m.parent,
                                metrics={k: float(v) for k, v in m.metrics.items() if v is not None},
                                created_at=m.created, status="rolled_back" if m.kind == "rollback" else "published")
        await self.sender.send(self.topics.versions, str(m.version), messages.encode(announce))
        if self.serving is not None:
            await self.serving.follow(m.version)

    def close(self) -> None:
        if self.consolidator is not None:
            self.consolidator.close()
        self.pool.shutdown(wait=True)
