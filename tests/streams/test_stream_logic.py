"""The stream roles' business logic without a broker: ledger, rounds and budget, judging once,
the update loop (dedupe, crash reconciliation, refused updates, canary), scoring and swaps.

Real rocksdict ledgers in tmp dirs, real tiny torch models, real judges (oracle; a counting
subclass of it to see calls).
"""

from __future__ import annotations

import asyncio
import math

import pytest
import torch

from actprm.model.build import publish_initial
from actprm.model.training.checkpoints import CheckpointStore
from actprm.model.training.consolidate import id_hash, validation_figures
from actprm.model.training.replay import FeatureMemo
from actprm.model.judges.clients import OracleJudge
from actprm.model.training.trainer import Trainer, TrainerConfig, load_trainable_state, trainable_state
from actprm.model.uncertainty import make_selector
from actprm.streams.roles.judging import judge_once
from actprm.streams.state.ledger import ADMITTED, CANARY, PENDING, SCORED, TRAINED, Ledger
from actprm.client.messages import AnnotationRequest, Label, Trajectory
from actprm.client import messages
from actprm.streams.roles.rounds import Admission, RoundKeeper, in_round
from actprm.streams.roles.scoring import mark_scored, score_batch
from actprm.streams.roles.swap import ServedModel, VersionFollower, load_for_swap
from actprm.streams.roles.training import UpdateLoop
from support.model import (assert_optimizer_states_equal, optimizer_state_snapshot, synthetic_samples, tiny_prm,
                           torch_one_thread)  # noqa: F401  (autouse fixture)


@pytest.fixture
def ledger(tmp_path):
    led = Ledger(tmp_path / "ledger")
    yield led
    led.close()


# --- ledger ------------------------------------------------------------------------------

def test_ledger_survives_reopen_and_a_transaction_lands_whole(tmp_path):
    led = Ledger(tmp_path / "l")
    with led.transaction():
        led.put(SCORED, "a", 3)
        led.put(TRAINED, "b", None)
    led.put(PENDING, "c", {"x": [1, 2]})
    led.close()
    led = Ledger(tmp_path / "l")
    assert led.get(SCORED, "a") == 3 and led.has(TRAINED, "b") and led.get(PENDING, "c") == {"x": [1, 2]}
    assert [k for k, _ in led.items(SCORED)] == ["a"] and led.count(PENDING) == 1
    with pytest.raises(RuntimeError):
        with led.transaction():
            led.put(SCORED, "z", 1)
            raise RuntimeError("crash inside the batch")
    assert not led.has(SCORED, "z")  # nothing of a failed transaction lands
    led.close()


# --- rounds and budget -------------------------------------------------------------------

def test_budget_is_never_exceeded_and_a_resend_is_free(ledger):
    keeper = RoundKeeper(ledger, default_budget=3)
    verdicts = [keeper.admit(f"t{i}") for i in range(5)]
    assert verdicts == [Admission.NEW] * 3 + [Admission.OVER_BUDGET] * 2
    assert keeper.admit("t0") is Admission.RESEND  # redelivered: forwarded again, not charged
    assert keeper.state.used == 3 and keeper.state.left == 0


def test_round_state_survives_restart_and_new_round_resets_counters(ledger):
    keeper = RoundKeeper(ledger, default_budget=2)
    keeper.admit("a")
    keeper.pause(annotate=True)
    assert keeper.admit("b") is Admission.PAUSED
    again = RoundKeeper(ledger, default_budget=99)  # a restart reads the saved round, not the default
    assert again.state.used == 1 and again.state.paused_annotate and again.state.budget == 2
    fresh = again.new_round(budget=5)
    assert (fresh.round_id, fresh.used, fresh.budget) == (1, 0, 5)
    assert fresh.paused_annotate  # a pause outlives the round; resume is explicit
    assert ledger.get(ADMITTED, "a") == 0  # what was admitted in round 0 stays admitted


def test_the_round_of_a_request_is_the_one_the_keeper_admitted_it_in(ledger):
    # A scorer in its own process stamps round 0; after reset-round the keeper's round counts.
    keeper = RoundKeeper(ledger, default_budget=5)
    old = AnnotationRequest(id="early", problem="p", steps=["a"], round_id=0, model_version=0, mu=[0.9])
    raw = messages.encode(old)
    assert keeper.admit("early") is Admission.NEW
    keeper.new_round(budget=5)
    late = old.model_copy(update={"id": "late"})
    assert keeper.admit("late") is Admission.NEW
    forwarded = messages.decode(AnnotationRequest, in_round(late, messages.encode(late), keeper.admitted_round("late")))
    assert forwarded.round_id == 1 and forwarded.model_copy(update={"round_id": 0}) == late
    # A redelivered request of round 0 keeps round 0 (its label follows reset-round's --keep-pending rule),
    # and a stamp that is already right is forwarded byte for byte.
    assert keeper.admit("early") is Admission.RESEND
    assert in_round(old, raw, keeper.admitted_round("early")) is raw


# --- judging -----------------------------------------------------------------------------

class CountingOracle(OracleJudge):
    def __init__(self):
        super().__init__()
        self.calls = 0

    async def judge(self, request):
        self.calls += 1
        return await super().judge(request)


def _request(i: str, gold: int | None = 1) -> AnnotationRequest:
    return AnnotationRequest(id=i, problem="p", steps=["a", "b", "c"], gold_first_error=gold, round_id=0,
                             model_version=0, mu=[0.9, 0.4, 0.3])


def test_a_trajectory_is_judged_once_whatever_is_redelivered(ledger):
    judge = CountingOracle()
    first = asyncio.run(judge_once(judge, ledger, _request("x")))
    again = asyncio.run(judge_once(judge, ledger, _request("x")))
    assert judge.calls == 1
    assert first.label.first_error == again.label.first_error == 1 and again.repeated
    # A failure is remembered too: a redelivered request is not judged again, and no label is guessed.
    bad = asyncio.run(judge_once(judge, ledger, _request("y", gold=None)))
    bad_again = asyncio.run(judge_once(judge, ledger, _request("y", gold=None)))
    assert bad.label is None and "no gold" in bad.failure and bad_again.repeated and judge.calls == 2


# --- the update loop ---------------------------------------------------------------------

def _label(sample, round_id: int = 0) -> Label:
    return Label(id=sample.id, first_error=sample.first_error, n_steps=len(sample.steps), judge="oracle",
                 round_id=round_id, problem=sample.problem, steps=sample.steps)


def _loop(tmp_path, ledger, cfg: TrainerConfig | None = None, **kwargs) -> UpdateLoop:
    cfg = cfg or TrainerConfig(warmup_steps=0)
    store = CheckpointStore(tmp_path / "ckpt")
    prm = tiny_prm()
    if store.latest() is None:
        publish_initial(store, prm, cfg)
    return UpdateLoop(Trainer(prm, cfg), store, ledger, kwargs.pop("batch_size", 4), kwargs.pop("max_wait_s", 60), **kwargs)


def test_averaged_versions_serve_a_share_of_the_last_one_and_training_goes_on_from_its_own(tmp_path, ledger):
    loop = _loop(tmp_path, ledger, serve_average=0.5)
    names = loop.trainer.trained_names()
    served = loop.store.load(0)[1]
    for s in synthetic_samples(8, seed=3):
        assert loop.receive(_label(s))
    for _ in range(2):  # the second update trains on from the trained weights, then averages again
        out = loop.update()
        trained = trainable_state(loop.trainer.prm, "heads")
        stored = loop.store.load(out.manifest.version)[1]
        for k in names:
            assert torch.allclose(stored[k], 0.5 * served[k] + 0.5 * trained[k], atol=1e-6)
            assert not torch.allclose(stored[k], trained[k])
        assert all(torch.equal(stored[k], trained[k]) for k in set(stored) - names)  # anchors, input scaling
        assert out.manifest.metrics["serve_average"] == 0.5
        served = stored
    # The consolidation's "served" figures are the stored version's; the trainer's weights stay
    val = synthetic_samples(6, seed=4)
    figures = loop.served_figures(val)
    assert all(torch.equal(v, trained[k]) for k, v in trainable_state(loop.trainer.prm, "heads").items())
    as_served = tiny_prm()
    load_trainable_state(as_served, served)
    assert figures == validation_figures(as_served, val)
    # A restart takes up the version serving: training and the average start again from it
    again = UpdateLoop(Trainer(tiny_prm(), TrainerConfig(warmup_steps=0)), loop.store, ledger, 4, 60, serve_average=0.5)
    assert all(torch.equal(trainable_state(again.trainer.prm, "heads")[k], served[k]) for k in names)
    assert all(torch.equal(again.served_state()[k], served[k]) for k in served)


def test_labels_are_trained_once_and_each_version_lists_what_it_consumed(tmp_path, ledger):
    loop = _loop(tmp_path, ledger)
    samples = synthetic_samples(6, seed=1)
    assert all(loop.receive(_label(s)) for s in samples)
    assert not loop.receive(_label(samples[0]))  # a redelivered label is dropped
    assert loop.ready()
    out = loop.update()
    assert out.manifest.version == 1 and out.manifest.parent == 0 and len(out.label_ids) == 4
    assert not loop.receive(_label(samples[0]))  # trained: still dropped
    second = loop.update()
    assert second.manifest.version == 2 and len(second.label_ids) == 2
    consumed = [i for v in loop.store.versions() for i in loop.store.manifest(v).consumed_label_ids]
    assert sorted(consumed) == sorted(s.id for s in samples)


def test_old_weights_are_pruned_after_each_update_and_a_restart_still_knows_every_trained_label(tmp_path):
    ledger = Ledger(tmp_path / "ledger")
    loop = _loop(tmp_path, ledger, batch_size=2, keep_versions=2)
    samples = synthetic_samples(8, seed=5)
    for s in samples:
        loop.receive(_label(s))
    while loop.pending():
        loop.update()
    assert loop.store.versions() == [0, 1, 2, 3, 4]
    assert loop.store.versions(with_weights=True) == [0, 3, 4]
    ledger.close()
    # The ledger is gone (a new disk, say): the manifests alone still say what was trained.
    restarted = _loop(tmp_path, Ledger(tmp_path / "ledger-new"), batch_size=2, keep_versions=2)
    assert restarted.version == 4 and not any(restarted.receive(_label(s)) for s in samples)


def test_a_crash_between_saving_a_version_and_marking_its_labels_is_reconciled(tmp_path):
    ledger = Ledger(tmp_path / "ledger")
    loop = _loop(tmp_path, ledger)
    samples = synthetic_samples(4, seed=2)
    for s in samples:
        loop.receive(_label(s))
    # The crash: the version is on disk, but the ledger never heard of it.
    trainer = loop.trainer
    trainer.update([])  # no-op batch: nothing changes
    loop.store.save(trainable_state(trainer.prm, "heads"), {"kind": "update", "parent": 0, "mode": "heads",
                                                               "consumed_label_ids": [s.id for s in samples]})
    ledger.close()
    ledger = Ledger(tmp_path / "ledger")
    restarted = _loop(tmp_path, ledger)
    assert restarted.version == 1 and restarted.pending() == []
    assert all(ledger.get(TRAINED, s.id) == 1 for s in samples)
    assert not restarted.receive(_label(samples[0]))
    ledger.close()


def test_a_non_finite_batch_is_refused_and_changes_no_weight(tmp_path, ledger):
    loop = _loop(tmp_path, ledger, TrainerConfig(warmup_steps=0, lr=1e39))
    before = {k: v.clone() for k, v in trainable_state(loop.trainer.prm, "heads").items()}
    for s in synthetic_samples(4, seed=3):
        loop.receive(_label(s))
    out = loop.update()
    assert out.manifest is None and out.rejected and loop.store.latest() == 0
    after = trainable_state(loop.trainer.prm, "heads")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert loop.pending() == []  # retired, not retried forever


def test_an_update_that_lowers_canary_f1_is_refused_and_weights_go_back(tmp_path, ledger):
    cfg = TrainerConfig(warmup_steps=0, lr=1.0, anchor_lambda=0.0)
    store = CheckpointStore(tmp_path / "ckpt")
    prm = tiny_prm()
    publish_initial(store, prm, cfg)
    pool = synthetic_samples(40, seed=4)
    # Centre the heads' output so version 1 predicts errors on some trajectories and not on others.
    lowest = torch.tensor([min(sc.mu) for sc in prm.score([(p.problem, p.steps) for p in pool])])
    with torch.no_grad():
        prm.heads.b3 -= torch.logit(lowest.median())
    store.save(trainable_state(prm, "heads"), {"kind": "update", "parent": 0, "mode": "heads"})
    loop = UpdateLoop(Trainer(prm, cfg), store, ledger, 4, 60, canary_size=16, canary_tolerance=0.0)
    # The canary's labels are what version 1 predicts, so its F1 is 1.0 and any change can only hurt.
    predicted = [s.first_error for s in prm.score([(p.problem, p.steps) for p in pool])]
    canary = [type(p)(p.id, p.problem, p.steps, k) for p, k in zip(pool, predicted)]
    chosen = [c for c in canary if c.first_error == -1][:8] + [c for c in canary if c.first_error >= 0][:8]
    assert len(chosen) == 16, "version 1 must predict both classes on this pool"
    for c in chosen:
        assert loop.receive(_label(c))
    assert ledger.count(CANARY) == 16 and loop.pending() == []  # held back, never trained
    assert loop.canary_f1(1) == 1.0
    before = {k: v.clone() for k, v in trainable_state(prm, "heads").items()}
    # Labels that say "every step is correct" push every score up: the predicted errors vanish.
    for s in synthetic_samples(8, seed=5, prefix="push"):
        loop.receive(_label(type(s)(s.id, s.problem, s.steps, -1)))
    out = loop.update()
    assert out.manifest is None and "canary F1 fell" in out.rejected
    assert store.latest() == 1
    after = trainable_state(prm, "heads")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_an_unwritable_checkpoint_dir_fails_the_update_loudly_and_keeps_the_labels(tmp_path, ledger):
    loop = _loop(tmp_path, ledger)
    for s in synthetic_samples(4, seed=6):
        loop.receive(_label(s))
    # A directory where the writer's lock file goes: every write fails with an OSError, as on a
    # full or read-only disk, also for root (chmod does not stop root).
    lock = loop.store.root / ".lock"
    lock.unlink(missing_ok=True)
    lock.mkdir()
    out = loop.update()
    assert out.manifest is None and out.error
    assert len(loop.pending()) == 4 and loop.store.latest() == 0


@pytest.mark.parametrize("refusal", ["non-finite", "checkpoint write"])
def test_a_refused_update_leaves_weights_optimizer_moments_and_step_as_they_were(tmp_path, ledger, refusal):
    loop = _loop(tmp_path, ledger, batch_size=2)
    samples = synthetic_samples(4, seed=11)
    for s in samples[:2]:
        loop.receive(_label(s))
    assert loop.update().manifest.version == 1  # moments a refusal could lose
    trainer = loop.trainer
    weights = {k: v.clone() for k, v in trainable_state(trainer.prm, "heads").items()}
    opt, step = optimizer_state_snapshot(trainer.optimizer), trainer.step
    for s in samples[2:]:
        loop.receive(_label(s))
    if refusal == "checkpoint write":  # the update trains, then its version cannot be written
        lock = loop.store.root / ".lock"
        lock.unlink(missing_ok=True)
        lock.mkdir()
    else:  # the update trains, then its weights are found non-finite
        real = trainer.fit

        def fit_then_poison(*a, **k):
            result = real(*a, **k)
            with torch.no_grad():
                trainer.prm.heads.b3.fill_(float("nan"))
            return result

        trainer.fit = fit_then_poison
    out = loop.update()
    assert out.manifest is None and (out.error if refusal == "checkpoint write" else "non-finite" in out.rejected)
    after = trainable_state(trainer.prm, "heads")
    assert all(torch.equal(weights[k], after[k]) for k in weights)
    assert_optimizer_states_equal(opt, optimizer_state_snapshot(trainer.optimizer))  # exp_avg, exp_avg_sq, step, lr
    assert trainer.step == step and loop.version == 1


def test_pending_labels_are_held_in_memory_in_arrival_order_and_the_ledger_keeps_them_across_a_restart(tmp_path):
    ledger = Ledger(tmp_path / "ledger")
    loop = _loop(tmp_path, ledger, batch_size=3, min_batch=2, max_wait_s=30)
    samples = synthetic_samples(5, seed=12)
    for s in samples[:2]:
        assert loop.receive(_label(s))
    assert not loop.ready() and loop.n_pending == 2
    received = loop.pending()[0][1]["received"]
    assert loop.ready(now=received + 30)  # min_batch waiting max_wait_s
    for s in samples[2:]:
        assert loop.receive(_label(s))
    assert not loop.receive(_label(samples[1]))  # pending: a redelivery is dropped
    ids = [s.id for s in samples]
    assert [i for i, _ in loop.pending()] == ids and [i for i, _ in loop.pending(3)] == ids[:3] and loop.ready()
    assert [i for i, _ in ledger.items(PENDING)] == sorted(ids)  # the durable copy, written first
    out = loop.update()
    assert out.label_ids == ids[:3] and [i for i, _ in loop.pending()] == ids[3:]
    assert sorted(i for i, _ in ledger.items(PENDING)) == ids[3:]
    ledger.close()
    ledger = Ledger(tmp_path / "ledger")
    restarted = _loop(tmp_path, ledger, batch_size=3)
    assert [i for i, _ in restarted.pending()] == ids[3:] and restarted.pending() == loop.pending()
    restarted.retire([ids[3]])
    assert [i for i, _ in restarted.pending()] == ids[4:] and not ledger.has(PENDING, ids[3])
    ledger.close()


# --- scoring and swaps -------------------------------------------------------------------

def test_scoring_skips_ids_already_scored_and_swaps_build_a_new_model_aside(tmp_path, ledger):
    cfg = TrainerConfig(warmup_steps=0, lr=0.05)
    store = CheckpointStore(tmp_path / "ckpt")
    prm = tiny_prm()
    publish_initial(store, prm, cfg)
    served = load_for_swap(ServedModel(-1, tiny_prm()), store, 0)
    batch = [Trajectory(id=s.id, problem=s.problem, steps=s.steps) for s in synthetic_samples(5, seed=7)]
    out = score_batch(served, make_selector("full"), ledger, batch + batch[:1])
    assert [r.id for r in out.rewards] == [t.id for t in batch] and out.duplicates == [batch[0].id]
    assert all(r.model_version == 0 and len(r.mu) == len(r.sigma) for r in out.rewards)
    assert len(out.candidates) == 5
    mark_scored(ledger, out.rewards)
    assert score_batch(served, make_selector("full"), ledger, batch).rewards == []

    trainer = Trainer(prm, cfg)
    trainer.update(synthetic_samples(4, seed=8))
    store.save(trainable_state(prm, "heads"), {"kind": "update", "parent": 0, "mode": "heads"})
    follower = VersionFollower(store)
    assert follower.newer_than(0) == 1
    new = follower.try_load(served, 1)
    assert new.version == 1 and new.prm is not served.prm and new.prm.backbone is served.prm.backbone
    assert not torch.equal(new.prm.heads.w1, served.prm.heads.w1)  # the old one kept its weights

    # A version that fails to load is remembered and never retried; the old one keeps serving.
    store.save(trainable_state(prm, "heads"), {"kind": "update", "parent": 1, "mode": "heads"})
    weights = store.root / "v000002" / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert follower.try_load(new, 2) is None and 2 in follower.failed
    assert follower.newer_than(1) is None
    assert math.isfinite(new.prm.score([("p", ["a", "b"])])[0].mu[0])


class NaNOnMarkedTrainer(Trainer):
    """Fault injection: a batch holding a marked problem gets NaN logits, as a corrupt input would."""

    def update(self, samples):
        if not any("POISON" in s.problem for s in samples):
            return super().update(samples)
        # head_logits: every update path reads the heads through it (text, or cached hidden states).
        real = self.prm.head_logits
        self.prm.head_logits = lambda *a, **k: real(*a, **k) * float("nan")
        try:
            return super().update(samples)
        finally:
            del self.prm.head_logits


def test_the_validation_sample_of_the_stream_is_judged_whether_selected_or_not(tmp_path, ledger):
    store = CheckpointStore(tmp_path / "ckpt")
    publish_initial(store, tiny_prm(), TrainerConfig(warmup_steps=0))
    served = load_for_swap(ServedModel(-1, tiny_prm()), store, 0)
    batch = [Trajectory(id=s.id, problem=s.problem, steps=s.steps, gold_first_error=s.first_error)
             for s in synthetic_samples(40, seed=3)]
    sample = {t.id for t in batch if id_hash(t.id) < 0.25}
    assert 0 < len(sample) < len(batch)
    none = make_selector("random", rate=0.0)
    memo = FeatureMemo()
    out = score_batch(served, none, ledger, batch, memo=memo, val_fraction=0.25)
    # The rule chose none: the sample alone goes to the judge, and no reward says selected.
    assert {c.id for c in out.candidates} == sample and out.validation == len(sample)
    assert not any(r.selected for r in out.rewards)
    assert [memo.take(t.id, t.problem, t.steps) is not None for t in batch] == [t.id in sample for t in batch]
    every = score_batch(served, make_selector("full"), Ledger(tmp_path / "l2"), batch, val_fraction=0.25)
    assert len(every.candidates) == len(batch) and every.validation == 0 and all(r.selected for r in every.rewards)
    # With the gold-label judge, a sampled trajectory without gold is not asked for either.
    no_gold = [t.model_copy(update={"gold_first_error": None}) for t in batch]
    assert score_batch(served, none, Ledger(tmp_path / "l3"), no_gold, needs_gold=True, val_fraction=0.25).candidates == []
    assert score_batch(served, none, Ledger(tmp_path / "l4"), batch).candidates == []  # no sample asked for


def test_one_poisoned_label_does_not_take_the_good_ones_in_its_batch_down(tmp_path, ledger):
    cfg = TrainerConfig(warmup_steps=0)
    store = CheckpointStore(tmp_path / "ckpt")
    prm = tiny_prm()
    publish_initial(store, prm, cfg)
    loop = UpdateLoop(NaNOnMarkedTrainer(prm, cfg), store, ledger, 8, 60)
    samples = synthetic_samples(8, seed=9)
    samples[5] = type(samples[5])(samples[5].id, "POISON " + samples[5].problem, samples[5].steps, samples[5].first_error)
    for s in samples:
        loop.receive(_label(s))
    out = loop.update()
    assert out.manifest is not None and out.manifest.version == 1
    good = sorted(s.id for i, s in enumerate(samples) if i != 5)
    assert sorted(out.manifest.consumed_label_ids) == good
    assert ledger.has(TRAINED, samples[5].id) and ledger.get(TRAINED, samples[5].id) is None  # retired alone
    assert loop.pending() == []


def test_an_id_scored_before_the_broker_lost_its_data_is_scored_again(tmp_path, ledger):
    cfg = TrainerConfig(warmup_steps=0)
    store = CheckpointStore(tmp_path / "ckpt")
    publish_initial(store, tiny_prm(), cfg)
    served = load_for_swap(ServedModel(-1, tiny_prm()), store, 0)
    batch = [Trajectory(id=s.id, problem=s.problem, steps=s.steps) for s in synthetic_samples(3, seed=10)]
    first = score_batch(served, make_selector("full"), ledger, batch, epoch="e1")
    mark_scored(ledger, first.rewards, epoch="e1")
    assert score_batch(served, make_selector("full"), ledger, batch, epoch="e1").rewards == []  # a redelivery
    # The broker came back without its data (a new epoch): the rewards sent before are gone with it.
    again = score_batch(served, make_selector("full"), ledger, batch, epoch="e2")
    assert [r.id for r in again.rewards] == [t.id for t in batch]
