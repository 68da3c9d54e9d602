"""Consolidation in the trainer role without a broker (tests/support/roles.py): the three steps
called in a chosen interleaving, so the labels that arrive while a candidate trains are
checked exactly: trained into the candidate, never consumed twice, none lost."""

from __future__ import annotations

import asyncio
import math
import os
import sys
import threading
from collections import Counter

import pytest
import torch

from actprm.client.messages import Label, ModelVersion
from actprm.streams.config import ConsolidateSettings, ProcessSettings
from actprm.model.training.consolidate import Figures, beats, validation_figures
from actprm.model.training.trainer import load_trainable_state, trainable_state
from actprm.streams.state.ledger import META, VALIDATED
from actprm.streams.tools.produce import synthetic_trajectories
from support.roles import event, memory_process, sent_to


@pytest.fixture
def proc(tmp_path):
    settings = ProcessSettings(state_dir=tmp_path / "state", model={"backbone": "tiny", "n_heads": 4, "max_length": 2048},
                               selection={"strategy": "full"}, update={"batch_size": 8, "steps": 2, "mini_batch": 8},
                               consolidate={"every_labels": 0, "epochs": 3, "mini_batch": 8, "val_fraction": 0.25})
    process, sent = memory_process(settings)
    process.sent = sent
    yield process
    process.close()


def _labels(n: int, seed: int) -> list[Label]:
    """Judged labels of the marker stream (gold first errors: what the tiny backbone can learn)."""
    return [Label(id=x.id, first_error=x.gold_first_error, n_steps=len(x.steps), judge="oracle", round_id=0,
                  problem=x.problem, steps=x.steps)
            for x in synthetic_trajectories(n, seed=seed, markers=True)]


def _train(proc, labels: list[Label]) -> None:
    t = proc.topics
    asyncio.run(proc.trainer.on_labels([event(t.labels, x, i) for i, x in enumerate(labels)]))
    while proc.trainer.updates.pending():
        asyncio.run(proc.trainer.maybe_update(force=True))


def test_labels_trained_while_a_candidate_trains_are_caught_up_and_consumed_once(proc):
    trainer = proc.trainer
    c, updates = trainer.consolidator, trainer.updates
    _train(proc, _labels(32, seed=1))
    snap = c.snapshot()  # step 1: what the candidate trains on
    assert len(snap.train) + len(snap.val) == 32 and snap.val and snap.served_version == updates.version
    meanwhile = _labels(16, seed=2)
    _train(proc, meanwhile)  # updates go on while the candidate trains
    served_before = updates.version
    cand = c.train(snap)  # step 2 (here after the updates, as if it had run beside them)
    outcome = c.finish(snap, cand)  # step 3: catch up, compare, publish or refuse
    rec = outcome.record
    assert rec["served_version"] == served_before
    # the labels that arrived meanwhile, minus those on the validation side, went into the candidate
    assert 0 < rec["labels_meanwhile"] <= 16 and rec["labels"] == len(snap.train) + rec["labels_meanwhile"]
    assert rec["val_labels"] == len(snap.val) + 16 - rec["labels_meanwhile"]  # the slice grew by the rest
    # nothing was consumed as new by the consolidation; every label by exactly one update
    consumed = Counter(i for v in updates.store.versions() for i in updates.store.manifest(v).consumed_label_ids)
    assert set(consumed.values()) == {1} and len(consumed) == 48
    m = outcome.manifest  # published: after 3 epochs it beats the served version on the slice (by its loss)
    assert m is not None and m.kind == "consolidate" and m.consumed_label_ids == [] and m.parent == served_before
    assert m.consolidated["labels_meanwhile"] == rec["labels_meanwhile"] and m.metrics["val_f1"] == rec["val_f1"]
    assert updates.version == m.version == updates.ledger.get(META, "trained_through")
    # the trainer continues from the published weights
    saved = updates.store.load(m.version)[1]
    assert all(torch.equal(saved[k], v) for k, v in trainable_state(updates.trainer.prm, "heads").items())


def test_a_batch_of_validation_labels_alone_publishes_no_version_and_keeps_them_for_validation(proc):
    trainer, updates = proc.trainer, proc.trainer.updates
    _train(proc, _labels(8, seed=4))
    version, replayed = updates.version, len(updates.replay)
    val_only = [x for x in _labels(64, seed=5) if trainer.updates.held_out(x.id)][:5]
    assert len(val_only) == 5
    _train(proc, val_only)  # all of them in the consolidations' validation slice
    assert updates.version == version and proc.store.latest() == version  # nothing to train: no version
    assert trainer.counts["labels_validation_only"] == 5 and not updates.pending()
    assert len(updates.replay) == replayed + 5
    assert {x.id for x in val_only} <= {s.id for s in trainer.consolidator.snapshot().val}
    asyncio.run(trainer.on_labels([event(proc.topics.labels, x, 100 + i) for i, x in enumerate(val_only)]))
    assert trainer.counts["labels_duplicate"] == 5 and not updates.pending()  # consumed once


def test_a_worse_candidate_is_refused_and_the_served_version_stays(proc):
    trainer = proc.trainer
    c, updates = trainer.consolidator, trainer.updates
    for seed in (3, 4, 5):  # a served version that has learnt something
        _train(proc, _labels(32, seed=seed))
    c.config.max_seconds = 1e-9  # no time to train: the candidate is the heads' initial weights
    served = updates.version
    before = {k: v.clone() for k, v in trainable_state(updates.trainer.prm, "heads").items()}
    snap = c.snapshot()
    outcome = c.finish(snap, c.train(snap))
    assert outcome.manifest is None and "does not beat the served version" in outcome.refused
    assert outcome.record["stopped"] == "time limit" and outcome.record["steps"] == 0
    assert updates.version == served and updates.store.latest() == served
    assert all((before[k] == v).all() for k, v in trainable_state(updates.trainer.prm, "heads").items())


def test_a_candidate_of_fixed_epochs_keeps_their_second_half_averaged_and_the_slice_still_gates_it(proc):
    # consolidate.average_epochs: no early stopping; the slice stays unseen and only gates
    trainer = proc.trainer
    c, updates = trainer.consolidator, trainer.updates
    for seed in (3, 4):
        _train(proc, _labels(32, seed=seed))
    c.config.average_epochs = 4
    snap = c.snapshot()
    trained = c.train(snap)
    cand = trained.candidate
    assert trained.refit is None and (cand.epochs, cand.averaged_epochs, cand.stopped) == (4, 2, "epochs")
    assert set(cand.train_ids) == {x.id for x in snap.train}
    outcome = c.finish(snap, trained)
    rec = outcome.record
    assert (rec["epochs"], rec["averaged_epochs"], rec["candidate"]) == (4, 2, True)
    assert (outcome.manifest is not None) == beats(Figures(rec["val_f1"], rec["val_loss"]),
                                                   Figures(rec["served_val_f1"], rec["served_val_loss"]))
    served = updates.version
    c.config.max_seconds = 1e-9  # no time to train: the served weights, which cannot beat themselves
    snap = c.snapshot()
    outcome = c.finish(snap, c.train(snap))
    assert outcome.manifest is None and "does not beat the served version" in outcome.refused
    assert updates.version == served


@pytest.mark.parametrize("validate_once", [True, False])
def test_a_slice_label_judges_one_consolidation_then_trains(proc, validate_once):
    # consolidate.validate_once: the slice's labels are the only ones that are not hard cases
    trainer = proc.trainer
    c, updates = trainer.consolidator, trainer.updates
    c.config.validate_once = validate_once
    _train(proc, _labels(32, seed=3))
    first = c.snapshot()
    judged = {s.id for s in first.val}
    assert judged and all(updates.held_out(i) for i in judged)
    c.finish(first, c.train(first))  # published or refused: either way the slice has judged it
    assert all(updates.held_out(i) != validate_once for i in judged)  # the updates' replay takes them
    assert {k for k, _ in updates.ledger.items(VALIDATED)} == (judged if validate_once else set())
    _train(proc, _labels(32, seed=4))
    second = c.snapshot()
    if validate_once:  # trained on; judged only on the slice's labels that came after
        assert judged <= {s.id for s in second.train} and second.val and not judged & {s.id for s in second.val}
    else:
        assert judged <= {s.id for s in second.val}
    outcome = c.finish(second, c.train(second))
    assert outcome.record["slice_labels_trained"] == (len(judged) if validate_once else 0)
    assert outcome.record["val_labels"] == len(second.val)
    # the end of a bounded run keeps its slice: another try there is judged on the same labels
    _train(proc, _labels(32, seed=5))
    end = c.snapshot(proc.settings.consolidate.at_end_config())
    validated = updates.validated
    c.finish(end, c.train(end))
    again = c.snapshot(proc.settings.consolidate.at_end_config())
    assert updates.validated == validated and {s.id for s in again.val} == {s.id for s in end.val}


def test_ctl_style_start_runs_the_steps_and_publishes_through_the_role(proc):
    trainer = proc.trainer
    _train(proc, _labels(32, seed=9))
    proc.sent.clear()

    async def go():
        message = trainer.consolidate("ctl")
        with pytest.raises(RuntimeError, match="already running"):
            trainer.consolidate("ctl")
        await trainer._consolidation
        return message

    message = asyncio.run(go())
    assert "consolidation started on the 32 labels kept" in message
    assert trainer.consolidator.running_since is None and trainer.consolidator.last is not None
    published = trainer.counts["consolidations"] == 1
    assert published or trainer.counts["consolidations_refused"] == 1
    versions = sent_to(proc.sent, proc.topics.versions, ModelVersion)
    assert [v.version for v in versions] == (trainer.consolidator.published if published else [])


def test_the_consolidation_at_the_end_of_a_bounded_run_trains_with_its_own_floor_patience_and_time(proc):
    trainer, s = proc.trainer, proc.settings.consolidate
    s.epochs, s.min_steps, s.patience, s.max_seconds = 50, 0, 1, 600.0
    s.at_end_min_steps, s.at_end_patience, s.at_end_max_seconds = 40, 2, 30.0
    end = s.at_end_config()
    assert (end.min_steps, end.patience, end.max_seconds, end.epochs, end.mini_batch) == (40, 2, 30.0, 50, s.mini_batch)
    s.at_end_min_steps = s.at_end_patience = s.at_end_max_seconds = None
    none = s.at_end_config()
    assert (none.min_steps, none.patience, none.max_seconds) == (0, 1, 600.0)  # None: the section's own
    _train(proc, _labels(32, seed=9))

    async def go():
        trainer.consolidate("end of run", end)
        await trainer._consolidation

    asyncio.run(go())
    last = trainer.consolidator.last
    # The section's floor (0) and patience (1) would have let the slice end it after one epoch.
    assert last["reason"] == "end of run" and (last["min_steps"], last["patience"]) == (40, 2)
    assert last["steps"] >= 40 and last["epochs"] >= 40 // math.ceil(last["labels"] / 8), last
    assert s.min_steps == 0 and s.patience == 1  # the settings themselves are left as they were


def test_the_end_of_a_bounded_run_publishes_the_refit_on_the_slice_too(proc):
    trainer, s = proc.trainer, proc.settings.consolidate
    c, updates = trainer.consolidator, trainer.updates
    for seed in (3, 4):
        _train(proc, _labels(32, seed=seed))
    end = s.at_end_config()
    assert end.refit and s.at_end_refit  # the default: a bounded run's last PRM learns the slice too
    snap = c.snapshot(end)
    trained = c.train(snap)
    cand = trained.candidate
    assert trained.refit is not None, cand.history  # it beat the weights it started from (3 epochs, tiny data)
    outcome = c.finish(snap, trained)
    m = outcome.manifest
    assert m is not None and m.consolidated["refit"]["labels"] == len(snap.train) + len(snap.val)
    assert m.consolidated["refit"]["epochs"] == cand.best_epoch and m.consolidated["candidate"]
    saved = updates.store.load(m.version)[1]  # what serves is the refit, not the candidate
    assert all(torch.equal(saved[k], v) for k, v in trainable_state(trained.refit.prm, "heads").items())
    # the candidate's figures gated it: the slice has seen the refit
    assert (m.consolidated["val_f1"], m.consolidated["val_loss"]) == (outcome.record["val_f1"], outcome.record["val_loss"])


def test_an_ungated_end_of_run_publishes_its_refit_even_when_the_slice_prefers_the_served_version(proc):
    # consolidate.at_end_gated = false: the served version may have been chosen on this slice,
    # so its figure there is optimistic; the run's last PRM is trained on every label regardless
    trainer, s = proc.trainer, proc.settings.consolidate
    c, updates = trainer.consolidator, trainer.updates
    for seed in (3, 4, 5):  # a served version that has learnt something
        _train(proc, _labels(32, seed=seed))
    s.at_end_gated = False
    end = s.at_end_config().model_copy(update={"max_seconds": 1e-9})  # the candidate: its initial weights
    snap = c.snapshot(end)
    trained = c.train(snap)
    assert trained.candidate.steps == 0 and trained.refit is not None  # refitted though it cannot beat its start
    outcome = c.finish(snap, trained)
    assert outcome.refused is None and outcome.manifest is not None, outcome.record
    assert not beats(Figures(outcome.record["val_f1"], outcome.record["val_loss"]),
                     Figures(outcome.record["served_val_f1"], outcome.record["served_val_loss"]))
    assert outcome.manifest.consolidated["gated"] is False and updates.version == outcome.manifest.version
    saved = updates.store.load(outcome.manifest.version)[1]
    assert all(torch.equal(saved[k], v) for k, v in trainable_state(trained.refit.prm, "heads").items())


def test_an_ungated_end_with_refit_epochs_trains_no_candidate_and_publishes_that_many_epochs_averaged(proc):
    # consolidate.refit_epochs: ungated, a candidate would only count the refit's epochs
    trainer, s = proc.trainer, proc.settings.consolidate
    c, updates = trainer.consolidator, trainer.updates
    for seed in (3, 4):
        _train(proc, _labels(32, seed=seed))
    s.at_end_gated, s.refit_epochs = False, 4
    end = s.at_end_config()
    assert end.refit_epochs == 4 and ConsolidateSettings().refit_epochs is None  # None: a candidate first
    snap = c.snapshot(end)
    trained = c.train(snap)
    assert trained.candidate is None and trained.published is trained.refit
    r = trained.refit
    assert (r.epochs, r.averaged_epochs) == (4, 2) and set(r.train_ids) == {x.id for x in snap.train + snap.val}
    outcome = c.finish(snap, trained)
    m = outcome.manifest
    assert m is not None and updates.version == m.version
    rec = m.consolidated
    assert rec["candidate"] is False and rec["refit"]["epochs"] == rec["epochs"] == 4 and rec["refit"]["averaged_epochs"] == 2
    assert rec["labels"] == rec["refit"]["labels"] == len(snap.train) + len(snap.val)
    saved = updates.store.load(m.version)[1]
    assert all(torch.equal(saved[k], v) for k, v in trainable_state(r.prm, "heads").items())
    # gated, refit_epochs is not read: the candidate decides whether the refit may be published
    s.at_end_gated = True
    snap = c.snapshot(s.at_end_config())
    assert c.train(snap).candidate is not None


def test_periodic_consolidations_never_refit_and_are_always_gated():
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        ConsolidateSettings(refit=True)
    with pytest.raises(ValidationError):
        ConsolidateSettings(gated=False)
    assert not ConsolidateSettings(at_end_refit=False).at_end_config().refit
    assert ConsolidateSettings().at_end_config().gated and not ConsolidateSettings(at_end_gated=False).at_end_config().gated


@pytest.mark.skipif(not sys.platform.startswith("linux"),
                    reason="only Linux gives each thread its own niceness (os.setpriority on a thread id)")
def test_the_candidate_trains_on_a_lower_priority_thread(proc):
    # consolidate.nice (10 by default): the consolidation thread, and the threads it starts
    # (such as torch's workers for its ops), give the cores to scoring first
    def nice() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    def nice_of_self_and_a_child() -> tuple[int, int]:
        seen = []
        child = threading.Thread(target=lambda: seen.append(nice()))
        child.start()
        child.join()
        return nice(), seen[0]

    caller = nice()
    mine, child = proc.trainer.consolidator.pool.submit(nice_of_self_and_a_child).result()
    assert mine == child == proc.settings.consolidate.nice == 10
    assert nice() == caller  # the caller's thread keeps its own


def test_with_averaged_versions_the_candidate_starts_from_and_is_compared_with_the_stored_version(tmp_path):
    settings = ProcessSettings(state_dir=tmp_path / "state", model={"backbone": "tiny", "n_heads": 4, "max_length": 2048},
                               selection={"strategy": "full"},
                               update={"batch_size": 8, "steps": 2, "mini_batch": 8, "serve_average": 0.5},
                               consolidate={"every_labels": 0, "epochs": 3, "mini_batch": 8, "val_fraction": 0.25})
    proc, proc.sent = memory_process(settings)
    try:
        c, updates = proc.trainer.consolidator, proc.trainer.updates
        prm = updates.trainer.prm
        _train(proc, _labels(32, seed=1))
        stored = updates.store.load(updates.version)[1]
        assert not torch.equal(stored["heads.w1"], trainable_state(prm, "heads")["heads.w1"])  # it serves an average
        snap = c.snapshot()
        assert all(torch.equal(snap.served_state[k], v) for k, v in stored.items())
        outcome = c.finish(snap, c.train(snap))
        assert outcome.manifest is not None  # after 3 epochs it beats the served version on the slice
        consolidated = updates.store.load(outcome.manifest.version)[1]
        # training and the average start again from the consolidated weights
        assert all(torch.equal(updates.served_state()[k], v) for k, v in consolidated.items())
        assert all(torch.equal(trainable_state(prm, "heads")[k], v) for k, v in consolidated.items())
        # the candidate was compared with the stored version, not with the trainer's weights
        load_trainable_state(prm, stored)
        assert outcome.record["served_val_f1"] == validation_figures(prm, snap.val).f1
    finally:
        proc.close()
