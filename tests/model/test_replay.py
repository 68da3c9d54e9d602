"""Updates that make progress: the mini-batch plan, Trainer.fit, the replay store, the feature
memo, and the update loop's guarantees with replay (real torch, the in-code tiny backbone)."""

from __future__ import annotations

import math

import pytest
import torch

from actprm.model.build import publish_initial
from actprm.model.training.checkpoints import CheckpointStore
from actprm.model.training.replay import FeatureMemo, ReplayStore
from actprm.model.training.trainer import FitConfig, LabelledSample, Trainer, TrainerConfig, plan_minibatches, trainable_state
from actprm.streams.state.ledger import Ledger
from actprm.client.messages import Label
from actprm.streams.roles.training import UpdateLoop

from support.model import synthetic_samples, tiny_prm, torch_one_thread  # noqa: F401


@pytest.fixture
def ledger(tmp_path):
    led = Ledger(tmp_path / "ledger")
    yield led
    led.close()


def _label(s: LabelledSample) -> Label:
    return Label(id=s.id, first_error=s.first_error, n_steps=len(s.steps), judge="oracle", round_id=0,
                 problem=s.problem, steps=s.steps)


def test_plan_deals_every_new_label_before_any_repeats_and_mixes_in_the_replay_share():
    g = torch.Generator().manual_seed(0)
    plan = plan_minibatches(40, 100, FitConfig(steps=6, mini_batch=32, replay_share=0.5), g)
    assert len(plan) == 6
    assert all(len(new) == 16 and len(replay) == 16 for new, replay in plan)
    assert all(len(set(new)) == len(new) and len(set(replay)) == len(replay) for new, replay in plan)
    # 40 new labels, 16 a step: all of them are in the first three steps (a deck of 40, dealt).
    assert set().union(*(set(new) for new, _ in plan[:3])) == set(range(40))


def test_plan_on_a_cold_start_and_with_replay_off():
    g = torch.Generator().manual_seed(1)
    cold = plan_minibatches(5, 0, FitConfig(steps=3, mini_batch=32, replay_share=0.5), g)
    assert cold == [([0, 1, 2, 3, 4], [])] * 3  # nothing to replay: the whole mini-batch is new
    off = plan_minibatches(5, 50, FitConfig(steps=2, mini_batch=8, replay_share=0.5, replay_size=0), g)
    assert all(replay == [] for _, replay in off)
    assert plan_minibatches(0, 50, FitConfig(), g) == []


def test_fit_takes_the_configured_steps_and_counts_the_replayed():
    prm = tiny_prm()
    trainer = Trainer(prm, TrainerConfig(warmup_steps=0, lr=1e-2))
    new, earlier = synthetic_samples(8, seed=1), synthetic_samples(20, seed=2, prefix="old")
    result = trainer.fit(new, earlier, FitConfig(steps=5, mini_batch=8, replay_share=0.5))
    assert result.applied and result.steps == 5 and trainer.step == 5
    assert 0 < result.n_replayed <= 20 and result.n_samples == 8
    assert all(s.features is not None for s in new)  # heads mode: one backbone pass, then the heads alone


def test_more_steps_per_update_learn_more_from_the_same_labels():
    samples = synthetic_samples(24, seed=3)

    def loss_after(steps: int) -> float:
        trainer = Trainer(tiny_prm(), TrainerConfig(warmup_steps=0, lr=1e-2))
        trainer.fit(samples, [], FitConfig(steps=steps, mini_batch=24))
        return trainer.update(samples).bce  # one more step, to read the loss on them

    assert loss_after(80) < 0.6 * loss_after(1)


def test_fit_is_all_or_nothing_when_a_step_is_not_finite():
    prm = tiny_prm()
    trainer = Trainer(prm, TrainerConfig(warmup_steps=0))
    before = trainable_state(prm, "heads")
    calls = {"n": 0}
    real = prm.head_logits

    def nan_on_third(*a, **k):
        calls["n"] += 1
        out = real(*a, **k)
        return out * float("nan") if calls["n"] == 3 else out

    prm.head_logits = nan_on_third
    try:
        result = trainer.fit(synthetic_samples(6, seed=4), [], FitConfig(steps=4, mini_batch=6))
    finally:
        del prm.head_logits
    assert not result.applied and "non-finite" in result.reason
    after = trainable_state(prm, "heads")
    assert all(torch.equal(before[k], after[k]) for k in before)  # the two applied steps were undone


def test_replay_store_is_bounded_oldest_out_and_survives_a_restart(tmp_path):
    store = ReplayStore(tmp_path / "replay", capacity=3, feature_key="k1")
    samples = synthetic_samples(5, seed=5)
    for i, s in enumerate(samples):
        s.features = torch.full((len(s.steps), 4), float(i))
    store.add(samples[:2])
    store.add(samples[2:])
    store.add(samples[4:])  # already stored: not kept twice
    assert [s.id for s in store.samples()] == [s.id for s in samples[2:]]
    assert len(list((tmp_path / "replay").glob("*.safetensors"))) == 3

    (tmp_path / "replay" / ".tmp-torn.safetensors").write_bytes(b"half a file")
    again = ReplayStore(tmp_path / "replay", capacity=3, feature_key="k1")
    assert [(s.id, s.problem, s.steps, s.first_error) for s in again.samples()] == \
           [(s.id, s.problem, s.steps, s.first_error) for s in samples[2:]]
    assert all(torch.equal(a.features, b.features) for a, b in zip(again.samples(), samples[2:]))
    assert not list((tmp_path / "replay").glob(".tmp-*"))
    # Another backbone's hidden states are not trusted: the text stays, the features go.
    other = ReplayStore(tmp_path / "replay", capacity=3, feature_key="k2")
    assert len(other) == 3 and all(s.features is None for s in other.samples())
    smaller = ReplayStore(tmp_path / "replay", capacity=1, feature_key="k1")
    assert [s.id for s in smaller.samples()] == [samples[4].id]


def test_feature_memo_hands_over_by_id_and_text_and_forgets_the_oldest():
    memo = FeatureMemo(capacity=2)
    f = torch.ones(2, 3)
    memo.put("a", "p", ["x", "y"], f)
    assert memo.take("a", "p", ["x", "CHANGED"]) is None  # same id, other text: never the wrong states
    memo.put("a", "p", ["x", "y"], f)
    memo.put("b", "p", ["x"], f)
    memo.put("c", "p", ["x"], f)
    assert memo.take("a", "p", ["x", "y"]) is None  # evicted
    assert memo.take("c", "p", ["x"]) is f and memo.take("c", "p", ["x"]) is None  # taken once


def test_update_loop_replays_earlier_labels_and_never_trains_a_redelivered_label_as_new(tmp_path, ledger):
    cfg = TrainerConfig(warmup_steps=0)
    store = CheckpointStore(tmp_path / "ckpt")
    prm = tiny_prm()
    publish_initial(store, prm, cfg)
    fit = FitConfig(steps=3, mini_batch=8, replay_share=0.5)

    def loop_():
        return UpdateLoop(Trainer(prm, cfg), store, ledger, 8, 60, fit=fit,
                          replay=ReplayStore(tmp_path / "replay", 100, "tiny"))

    loop = loop_()
    first, second = synthetic_samples(8, seed=6, prefix="a"), synthetic_samples(8, seed=7, prefix="b")
    assert all(loop.receive(_label(s)) for s in first)
    out = loop.update()
    assert out.manifest.metrics["labels_new"] == 8 and out.manifest.metrics["labels_replayed"] == 0
    assert out.manifest.metrics["steps"] == 3

    # A restart: the replay store is the directory, so the next update replays the first batch.
    loop = loop_()
    assert len(loop.replay) == 8
    assert not any(loop.receive(_label(s)) for s in first)  # redelivered: not a new label
    assert all(loop.receive(_label(s)) for s in second)
    out = loop.update()
    assert sorted(out.manifest.consumed_label_ids) == sorted(s.id for s in second)
    assert out.manifest.metrics["labels_new"] == 8 and 0 < out.manifest.metrics["labels_replayed"] <= 8
    assert math.isfinite(out.manifest.metrics["loss"])
    assert len(loop.replay) == 16 and loop.pending() == []
