"""The roles' handlers called directly, without a broker: what each sends for what it takes.

A process is built as `actprm run` builds it (tests/support/roles.py), on the tiny backbone,
with a Sender whose broker is a list. The broker tests (test_daemon.py and the fault suite)
cover the wiring; these cover each role's own rule, and one trajectory's whole way from its
topic to the swap its label causes.
"""

from __future__ import annotations

import asyncio

import pytest

from actprm.streams.config import ProcessSettings
from actprm.client.messages import AnnotationRequest, DeadLetter, Label, ModelVersion, Reward, Trajectory
from actprm.client.messages import encode
from actprm.streams.kafka.sender import Event
from actprm.streams.tools.produce import synthetic_trajectories
from support.roles import event, memory_process, sent_to


def settings(tmp_path, **kw) -> ProcessSettings:
    # max_length: every step of the built-in stream fits, so every trajectory has scores to select on
    return ProcessSettings(state_dir=tmp_path, model={"backbone": "tiny", "n_heads": 4, "max_length": 2048},
                    selection={"strategy": "full"}, update={"batch_size": 4, "steps": 2, "mini_batch": 4}, **kw)


@pytest.fixture
def proc(tmp_path):
    process, sent = memory_process(settings(tmp_path / "state"))
    process.sent = sent
    yield process
    process.close()


def run(coro):
    return asyncio.run(coro)


def trajectories(n: int, seed: int = 3) -> list[Trajectory]:
    return synthetic_trajectories(n, seed=seed)


def test_the_scorer_rewards_each_trajectory_once_and_dead_letters_what_it_cannot_read(proc):
    t = proc.topics
    stream = trajectories(5)
    bad = Event(t.trajectories, 0, 9, b"broken", b"{not json")
    run(proc.scorer.on_trajectories([event(t.trajectories, x, i) for i, x in enumerate(stream)] + [bad]))
    rewards = sent_to(proc.sent, t.rewards, Reward)
    assert sorted(r.id for r in rewards) == sorted(x.id for x in stream)
    assert all(r.model_version == 0 and len(r.mu) == len(r.sigma) <= r.n_steps for r in rewards)
    assert {c.id for c in sent_to(proc.sent, t.candidates, AnnotationRequest)} == {x.id for x in stream}  # strategy full
    dead = sent_to(proc.sent, t.dead_letters, DeadLetter)
    assert len(dead) == 1 and dead[0].offset == 9

    before = len(proc.sent)
    run(proc.scorer.on_trajectories([event(t.trajectories, x, i) for i, x in enumerate(stream[:2])]))  # redelivered
    assert len(proc.sent) == before and proc.scorer.counts["duplicates_skipped"] == 2
    st = proc.status()
    assert (st["scored"], st["selected"], st["dead_lettered"], st["selected_pct"]) == (5, 5, 1, 100.0)


def test_a_retry_in_a_new_record_gets_the_kept_reward_again_without_a_second_score_or_charge(proc):
    t = proc.topics
    stream = trajectories(3)
    run(proc.scorer.on_trajectories([event(t.trajectories, x, i) for i, x in enumerate(stream)]))
    first = {r.id: r for r in sent_to(proc.sent, t.rewards, Reward)}
    candidates = len(sent_to(proc.sent, t.candidates, AnnotationRequest))
    # A caller's retry is the same id in a later record (client ids come from the content).
    run(proc.scorer.on_trajectories([event(t.trajectories, stream[1], 10)]))
    again = sent_to(proc.sent, t.rewards, Reward)[3:]
    assert [r.id for r in again] == [stream[1].id] and again[0] == first[stream[1].id]  # the same reward, resent
    assert len(sent_to(proc.sent, t.candidates, AnnotationRequest)) == candidates  # not selected (charged) again
    assert proc.scorer.counts["scored"] == 3 and proc.scorer.counts["rewards_resent"] == 1


def test_with_the_gold_label_judge_a_sample_without_gold_is_never_selected(proc):
    t = proc.topics
    proc.scorer.needs_gold = True
    gold, no_gold = trajectories(2)
    no_gold = no_gold.model_copy(update={"gold_first_error": None})
    gold = gold.model_copy(update={"gold_first_error": 0})
    run(proc.scorer.on_trajectories([event(t.trajectories, gold, 0), event(t.trajectories, no_gold, 1)]))
    rewards = {r.id: r for r in sent_to(proc.sent, t.rewards, Reward)}
    assert set(rewards) == {gold.id, no_gold.id}  # both rewarded (strategy full: both uncertain)
    assert rewards[gold.id].selected and not rewards[no_gold.id].selected
    assert [c.id for c in sent_to(proc.sent, t.candidates, AnnotationRequest)] == [gold.id]
    assert proc.scorer.counts["not_selected_no_gold"] == 1


def request(trajectory: Trajectory, round_id: int = 0) -> AnnotationRequest:
    return AnnotationRequest(id=trajectory.id, problem=trajectory.problem, steps=trajectory.steps,
                             gold_first_error=trajectory.gold_first_error, round_id=round_id, model_version=0,
                             mu=[0.5] * len(trajectory.steps))


def test_the_keeper_charges_an_id_once_and_forwards_it_in_its_own_round(proc):
    t = proc.topics
    proc.keeper.set_budget(2)
    a, b, c = (request(x, round_id=7) for x in trajectories(3))  # a scorer elsewhere stamps a guess
    run(proc.keeper.on_candidates([event(t.candidates, m) for m in (a, b, a, c)]))
    forwarded = sent_to(proc.sent, t.annotations, AnnotationRequest)
    assert [m.id for m in forwarded] == [a.id, b.id, a.id]  # a again, free; c is over the budget
    assert all(m.round_id == 0 for m in forwarded)
    assert proc.keeper.rounds.state.used == 2
    counts = proc.keeper.counts
    assert (counts["annotation_requests"], counts["annotation_resends"], counts["not_requested_over_budget"]) == (2, 1, 1)


def test_the_judge_calls_the_judge_once_per_id_and_resends_the_stored_label(proc):
    t = proc.topics
    x = trajectories(1)[0]
    run(proc.judge.on_annotations([event(t.annotations, request(x))]))
    run(proc.judge.on_annotations([event(t.annotations, request(x))]))  # redelivered
    labels = sent_to(proc.sent, t.labels, Label)
    assert [l.first_error for l in labels] == [x.gold_first_error] * 2 and labels[0].scored_version == 0
    assert (proc.judge.counts["judged"], proc.judge.counts["judge_repeats"]) == (1, 1)


def test_one_trajectory_from_its_topic_to_the_swap_its_label_causes(proc):
    """The path the README draws: trajectories -> reward -> candidate -> annotation -> label ->
    update -> version -> swap, each hop one role's handler, each taking what the last one sent."""
    t = proc.topics
    stream = trajectories(4)

    def taken(topic: str) -> list[Event]:
        return [Event(topic, 0, i, key, value) for i, (name, key, value) in enumerate(proc.sent) if name == topic]

    run(proc.scorer.on_trajectories([event(t.trajectories, x) for x in stream]))
    run(proc.keeper.on_candidates(taken(t.candidates)))
    run(proc.judge.on_annotations(taken(t.annotations)))
    run(proc.trainer.on_labels(taken(t.labels)))
    assert len(proc.trainer.updates.pending()) == 4 and proc.trainer.updates.ready()
    run(proc.trainer.maybe_update())
    versions = sent_to(proc.sent, t.versions, ModelVersion)
    assert [(v.version, v.parent, v.status) for v in versions] == [(1, 0, "published")]
    assert proc.scorer.serving.current.version == 1  # this process's scorer switched at once
    assert set(proc.trainer.store.manifest(1).consumed_label_ids) == {x.id for x in stream}

    proc.sent.clear()
    run(proc.scorer.on_trajectories([event(t.trajectories, x) for x in trajectories(2, seed=4)]))
    assert {r.model_version for r in sent_to(proc.sent, t.rewards, Reward)} == {1}
    st = proc.status()
    assert (st["updates"], st["labels_trained"], st["served_version"], st["trained_version"], st["swaps"]) == (1, 4, 1, 1, 1)
    assert st["online"]["labels"] == 4  # each label first tested version 0, which asked for it


def test_a_label_of_a_round_reset_without_keep_pending_is_dropped(proc):
    x, y = trajectories(2)
    late = Label(id=x.id, first_error=-1, n_steps=len(x.steps), judge="oracle", round_id=0, problem=x.problem, steps=x.steps)
    assert run(proc.trainer.drop_pending_before(1)) == 0
    run(proc.trainer.on_labels([event(proc.topics.labels, late),
                                event(proc.topics.labels, late.model_copy(update={"id": y.id, "round_id": 1}))]))
    assert (proc.trainer.counts["labels_stale_round"], proc.trainer.counts["labels_received"]) == (1, 1)


def test_a_version_that_fails_to_load_keeps_the_old_one_serving(proc):
    store = proc.trainer.store
    manifest, tensors = store.load(0)
    store.save({k: v[:1] if v.dim() else v for k, v in tensors.items()}, manifest.model_dump() | {"kind": "update", "parent": 0})  # wrong shapes
    run(proc.scorer.serving.follow())
    st = proc.status()
    assert st["served_version"] == 0 and st["swap_failures"] == 1
    assert st["last_error"].startswith("version 1 failed to load")
    run(proc.scorer.serving.follow())  # not tried again
    assert proc.status()["swap_failures"] == 1


def test_the_scorer_follows_an_announced_version_and_ignores_what_it_cannot_use(proc):
    store = proc.trainer.store
    manifest, tensors = store.load(0)
    store.save({k: v + 0.5 for k, v in tensors.items()}, manifest.model_dump() | {"kind": "update", "parent": 0})
    serving = proc.scorer.serving

    def announce(version: int, status: str = "published") -> bytes:
        return encode(ModelVersion(version=version, location=str(store.root), parent=0, status=status))

    run(serving.on_announcement(b"{not json"))  # logged, nothing else
    run(serving.on_announcement(announce(1, "rejected")))
    run(serving.on_announcement(announce(0)))  # not newer
    assert serving.current.version == 0 and proc.status()["swaps"] == 0
    run(serving.on_announcement(announce(1)))
    assert serving.current.version == 1 and proc.status()["swaps"] == 1
    run(serving.on_announcement(announce(7)))  # announced, but not in the store: a failed load, v1 serves on
    st = proc.status()
    assert (st["served_version"], st["swap_failures"]) == (1, 1) and st["last_error"].startswith("version 7 failed")
