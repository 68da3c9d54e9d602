"""Consolidations in the trainer's process: train a candidate on every label kept, beside the
online loop, and publish it only if it beats the served version (model/training/consolidate.py).

Three steps, so scoring and updates never wait for the training:
1. on the training thread (where updates run, so the replay store is not changing): a
   snapshot of the labels kept, split into training and validation ids (a hash of each id);
2. on a thread of its own: `consolidation_candidate`, up to `consolidate.epochs` with early
   stopping on the validation slice (or `consolidate.average_epochs`, averaged), bounded by
   `consolidate.max_seconds`; updates go on meanwhile;
3. back on the training thread: the labels that updates trained meanwhile are trained into the
   candidate too (one update's worth of steps, so none is lost from the weights), then the
   candidate and the weights serving now are scored on the whole validation slice; the
   candidate is saved as the next version only if it is better, and updates continue from it.
   With `refit` (the consolidation that ends a bounded run, `consolidate.at_end_refit`) step 2
   also trains the same recipe on the slice's labels too, and that PRM is what is saved; an
   ungated one (`consolidate.at_end_gated = false`) is saved whatever the slice says, and with
   `consolidate.refit_epochs` it trains only the refit, for that many epochs.
A consolidation consumes no new label: its manifest's `consumed_label_ids` is empty and no
label is marked trained, so none is trained as new twice; the manifest's `consolidated` says
how it was trained and both validation figures. With `consolidate.validate_once` (the default)
the slice's labels it was judged on train from then on, in later consolidations and in the
updates' replay, and the next one is judged on the slice's labels that came after them.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import structlog

from actprm.model.training.checkpoints import CheckpointError, Manifest
from actprm.model.training.consolidate import (Candidate, ConsolidateConfig, Figures, beats, consolidation_candidate,
                                               refit_candidate, validation_figures, validation_ids)
from actprm.model.training.trainer import LabelledSample, trainable_state
from actprm.streams.state.ledger import META

log = structlog.get_logger("actprm")


@dataclass
class Snapshot:
    train: list[LabelledSample]
    val: list[LabelledSample]
    served_version: int
    served_state: dict
    config: ConsolidateConfig  # how this one trains (the settings, or those of the end of a bounded run)
    # Its slice trains once it has judged (consolidate.validate_once). Not at the end of a bounded
    # run: nothing comes after it, and another try there (at_end_tries) is judged on the same slice.
    validate_once: bool = False


@dataclass
class Trained:
    candidate: Candidate | None  # trained on the labels, judged on the slice; None: an ungated refit of fixed epochs
    refit: Candidate | None  # the same recipe on the slice's labels too (consolidate.refit)

    @property
    def published(self) -> Candidate:
        """What serves if published: the refit, when there is one."""
        return self.refit or self.candidate


@dataclass
class ConsolidationOutcome:
    manifest: Manifest | None  # the published version; None when refused or failed
    record: dict  # what the journal, the status and the manifest say about it
    refused: str | None = None
    error: str | None = None


def lower_priority(nice: int) -> None:
    """Run the calling thread (and the threads it starts later, such as torch's OpenMP workers
    for its work) at niceness `nice`. On Linux a niceness belongs to a thread; elsewhere, or
    when refused, the thread keeps its priority."""
    if nice <= 0:
        return
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except (AttributeError, OSError) as err:
        log.info("consolidation thread keeps its priority", error=str(err))


class Consolidator:
    """Starts consolidations (every `every_labels` labels trained, or when asked) and finishes
    them on the update loop's thread. One at a time."""

    def __init__(self, updates, config: ConsolidateConfig, train_pool: ThreadPoolExecutor):
        # config: the `consolidate` settings section (read live: `ctl set` changes it in place)
        self.updates, self.config = updates, config
        # Its validation slice is kept out of the online updates by the update loop itself
        # (UpdateLoop.held_out, given these settings): the served version is then compared with
        # the candidate on labels neither has trained on.
        self.train_pool = train_pool  # the update loop's own thread
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="actprm-consolidate", initializer=lower_priority,
                                       initargs=(getattr(config, "nice", 0),))
        self.running_since: float | None = None
        self.labels_since = 0  # labels trained by updates since the last consolidation started
        self.last: dict | None = None
        self.published: list[int] = []  # versions that are consolidations, oldest first
        # A bounded run whose stream is all scored ends with a consolidation on every label kept;
        # a periodic one started meanwhile would only delay that one (daemon/demo.py sets it).
        self.hold_periodic = False
        self._cancel = False
        self._seq = 0

    # --- when ---------------------------------------------------------------------------------

    def due(self, labels_trained: int) -> bool:
        """Count labels an update trained; True when a consolidation should start now."""
        self.labels_since += labels_trained
        every = self.every_labels
        return bool(every) and self.labels_since >= every and self.running_since is None and not self.hold_periodic

    @property
    def every_labels(self) -> int:
        return getattr(self.config, "every_labels", 0)

    def status(self) -> dict:
        return {"running": self.running_since is not None,
                "running_s": round(time.time() - self.running_since, 1) if self.running_since else None,
                "labels_since": self.labels_since, "every_labels": self.every_labels,
                "published_versions": self.published[-10:], "last": self.last}

    # --- the three steps ----------------------------------------------------------------------

    def snapshot(self, config: ConsolidateConfig | None = None) -> Snapshot:
        """Step 1, on the training thread: the labels kept, split; the served weights; how the
        candidate will train (default: the settings as they are now)."""
        u = self.updates
        kept = u.replay.samples() if u.replay is not None else []
        val_ids = self.slice_ids(kept)
        return Snapshot([s for s in kept if s.id not in val_ids], [s for s in kept if s.id in val_ids], u.version,
                        u.served_state(), config or self.config,
                        validate_once=config is None and getattr(self.config, "validate_once", False))

    def slice_ids(self, kept: Sequence[LabelledSample]) -> set[str]:
        """The validation slice among the labels kept: those of the stream's sample (or of the
        selected labels) that no earlier consolidation was judged on."""
        validated = self.updates.validated
        return validation_ids([(s.id, s.first_error) for s in kept if s.id not in validated], self.config.val_fraction)

    def train(self, snap: Snapshot) -> Trained:
        """Step 2, on the consolidation thread: the candidate, and its refit (the served PRM is only read)."""
        u = self.updates
        cfg = snap.config
        self._seq += 1
        seed = u.trainer.config.seed + 7919 * self._seq

        def refit(epochs: int) -> Candidate:
            return refit_candidate(u.trainer.prm, u.trainer.config, epochs, snap.train, snap.val, cfg, seed=seed,
                                   served_state=snap.served_state, cancelled=lambda: self._cancel)

        if cfg.refit and not cfg.gated and cfg.refit_epochs:  # nothing for a candidate to decide
            return Trained(None, refit(cfg.refit_epochs))
        cand = consolidation_candidate(u.trainer.prm, u.trainer.config, snap.train, snap.val, cfg, seed=seed,
                                       served_state=snap.served_state, cancelled=lambda: self._cancel)
        # A refit only when it may be published: ungated, or the candidate beats where it started
        # (the served weights of the snapshot; from fresh heads that is not known here, so always).
        if cfg.refit and (not cfg.gated or cfg.start != "served" or beats(cand.figures, cand.start_figures)):
            return Trained(cand, refit(cand.best_epoch))
        return Trained(cand, None)

    def finish(self, snap: Snapshot, trained: Trained) -> ConsolidationOutcome:
        """Step 3, on the training thread: catch up, compare, publish or refuse."""
        u = self.updates
        trainer = u.trainer
        seen = {s.id for s in snap.train} | {s.id for s in snap.val}
        kept = u.replay.samples() if u.replay is not None else []
        val_ids = self.slice_ids(kept)
        meanwhile = [s for s in kept if s.id not in seen and s.id not in val_ids]
        val = [s for s in kept if s.id in val_ids]
        if meanwhile:  # trained online while the candidate trained: into the candidate too
            for c in (trained.candidate, trained.refit):
                if c is not None:
                    c.trainer.fit(meanwhile, [s for s in kept if s.id not in val_ids and s.id in seen], u.fit)
        # The candidate's figures judge it; with no candidate, the refit's are only a check (it trained on the slice)
        judged = trained.candidate or trained.refit
        served = u.served_figures(val)
        figures = validation_figures(judged.prm, val)
        record = {"served_version": u.version, "snapshot_version": snap.served_version, "start": snap.config.start,
                  "min_steps": snap.config.min_steps, "patience": snap.config.patience,
                  "epochs": judged.epochs, "best_epoch": judged.best_epoch, "steps": judged.steps,
                  "stopped": judged.stopped, "val_trusted": judged.val_trusted, "averaged_epochs": judged.averaged_epochs,
                  "candidate": trained.candidate is not None,
                  "labels": len(judged.train_ids) + len(meanwhile), "labels_meanwhile": len(meanwhile),
                  "slice_labels_trained": sum(1 for s in snap.train if s.id in u.validated),
                  "val_labels": len(val), "val_f1": figures.f1, "val_loss": round(figures.loss, 5),
                  "served_val_f1": served.f1, "served_val_loss": round(served.loss, 5),
                  "seconds": round(sum(c.seconds for c in (trained.candidate, trained.refit) if c is not None), 3),
                  "gated": snap.config.gated, "history": judged.history}
        if trained.refit is not None:
            r = trained.refit
            record["refit"] = {"labels": len(r.train_ids) + len(meanwhile), "epochs": r.epochs, "steps": r.steps,
                               "stopped": r.stopped, "seconds": r.seconds, "val_f1_seen": r.figures.f1,
                               "averaged_epochs": r.averaged_epochs}
        if snap.config.gated and not beats(figures, served):
            self.judged_on(snap, val, None)
            return ConsolidationOutcome(None, record, refused=_why_not(figures, served))
        mode = trainer.config.mode
        fields = {"kind": "consolidate", "parent": u.version, "mode": mode, "backbone": trainer.prm.backbone.reference(),
                  "prm": asdict(trainer.prm.config), "settings": trainer.config.model_dump(mode="json"),
                  "consumed_label_ids": [], "consolidated": {k: v for k, v in record.items() if k != "history"},
                  "metrics": {"val_f1": figures.f1, "served_val_f1": served.f1, "val_loss": figures.loss,
                              "labels_new": 0, "labels_consolidated": record["labels"], "epochs": judged.epochs}}
        state = trainable_state(trained.published.prm, mode)
        try:
            manifest = u.store.save(state, fields)
        except CheckpointError as err:
            return ConsolidationOutcome(None, record, error=str(err))
        u.ledger.put(META, "trained_through", manifest.version)
        self.judged_on(snap, val, manifest.version)
        u.version = manifest.version
        u.take_up(state)  # updates go on from the consolidated weights, with fresh optimizer moments
        self.published.append(manifest.version)
        return ConsolidationOutcome(manifest, record | {"version": manifest.version})

    def judged_on(self, snap: Snapshot, val: Sequence[LabelledSample], version: int | None) -> None:
        """The slice has judged a consolidation (published as `version`, or refused: None)."""
        if snap.validate_once:
            self.updates.validated_once([s.id for s in val], version)

    async def run(self, reason: str, on_done: Callable[[ConsolidationOutcome], object],
                  config: ConsolidateConfig | None = None) -> None:
        """The three steps; `on_done` (on the event loop) journals and publishes the outcome.
        config: how the candidate trains (default: the settings as they are now)."""
        loop = asyncio.get_running_loop()
        try:
            snap = await loop.run_in_executor(self.train_pool, self.snapshot, config)
            log.info("consolidation started", reason=reason, labels=len(snap.train), val_labels=len(snap.val),
                     served_version=snap.served_version, start=snap.config.start, min_steps=snap.config.min_steps)
            trained = await loop.run_in_executor(self.pool, self.train, snap)
            outcome = await loop.run_in_executor(self.train_pool, self.finish, snap, trained)
        except Exception as err:  # noqa: BLE001 - a failed consolidation never stops the trainer
            log.exception("consolidation failed; the served version stays")
            outcome = ConsolidationOutcome(None, {"reason": reason}, error=f"consolidation failed: {str(err).splitlines()[0]}")
        finally:
            self.running_since = None
        outcome.record["reason"] = reason
        self.last = {k: v for k, v in outcome.record.items() if k != "history"} | {
            "published": outcome.manifest is not None, "refused": outcome.refused, "error": outcome.error}
        await on_done(outcome)

    def begin(self) -> None:
        """Mark one as running (on the event loop, before its task starts)."""
        if self.running_since is not None:
            raise RuntimeError(f"a consolidation is already running (for {time.time() - self.running_since:.0f} s)")
        self.running_since = time.time()
        self.labels_since = 0

    def close(self) -> None:
        self._cancel = True  # a candidate in training stops at its next step
        self.pool.shutdown(wait=True)


def _why_not(candidate: Figures, served: Figures) -> str:
    def f(x):
        return "n/a" if x is None else f"{x:.3f}"

    return (f"candidate validation F1 {f(candidate.f1)} (loss {candidate.loss:.4f}) does not beat the served "
            f"version's {f(served.f1)} (loss {served.loss:.4f})")
