"""The daemon end to end: a real `actprm run` process on a real broker, the tiny backbone.

Trajectories in -> every id rewarded; selected ones judged; labels trained in incremental
updates; scorers hot-swap to the new versions; and redelivery (a crash, a producer that sends
twice, requests and labels sent again) never costs a second judge call or gradient step.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest

from actprm.streams.tools.produce import synthetic_trajectories
from actprm.client.messages import Trajectory
from actprm.streams.tools.produce import produce_trajectories
from actprm.client.topics import Topics
from support.daemon import Daemon, all_consumed, consumed_ids, manifests, publish, read_topic
from support.wait import wait_until
from support.faulty_judge import FaultyJudge

pytestmark = [pytest.mark.broker, pytest.mark.slow]


def _stream(n: int, tag: str) -> list[Trajectory]:
    items = [t.model_copy(update={"id": f"{tag}-{t.id}"}) for t in synthetic_trajectories(n, seed=7)]
    assert len({t.problem for t in items}) == n, "the judge server counts calls by problem text"
    return items


def _rewards_for(bootstrap: str, topics: Topics, ids: set[str], timeout_s: float = 60) -> list:
    return read_topic(bootstrap, topics.rewards, until=lambda got: ids <= {r.id for r in got}, timeout_s=timeout_s)


def test_every_trajectory_is_rewarded_judged_trained_once_and_scored_by_new_versions(broker, topic_prefix, tmp_path):
    topics = Topics(topic_prefix)
    stream = _stream(48, "e2e")
    first, second = stream[:24], stream[24:]
    daemon = Daemon(broker.bootstrap, topic_prefix, tmp_path, "--max-trajectories", "48").start()
    try:
        produce_trajectories(broker.bootstrap, topic_prefix, first)
        # The second half arrives after an update, so some rewards must come from a new version.
        wait_until(lambda: (daemon.store.latest() or 0) >= 1, 180, what="the first update")
        produce_trajectories(broker.bootstrap, topic_prefix, second)
        assert daemon.wait(300) == 0, daemon.stderr()[-3000:]
    finally:
        daemon.kill()

    ids = {t.id for t in stream}
    rewards = _rewards_for(broker.bootstrap, topics, ids)
    per_id = Counter(r.id for r in rewards)
    assert set(per_id) == ids
    assert max(per_id.values()) == 1, "no crash happened, so nothing may be scored twice"
    versions = {r.model_version for r in rewards}
    assert 0 in versions and max(versions) >= 1, versions
    for r in rewards:
        assert len(r.mu) == len(r.sigma) <= r.n_steps

    # Judged with the gold label (oracle), each selected id once; every label trained exactly once.
    gold = {t.id: t.gold_first_error for t in stream}
    labels = read_topic(broker.bootstrap, topics.labels)
    assert labels and all(l.first_error == gold[l.id] for l in labels)
    selected = {r.id for r in rewards if r.selected}
    assert {l.id for l in labels} == selected
    trained = consumed_ids(daemon.store)
    assert set(trained) <= selected and all_consumed(daemon.store, selected) and max(trained.values()) == 1
    updates = [m for m in manifests(daemon.store) if m.kind == "update"]
    assert len(updates) >= 2
    assert [m.version for m in manifests(daemon.store)] == list(range(len(updates) + 1))

    # Every structured log record names the process's roles, round and model version.
    records = [json.loads(line) for line in daemon.stderr().splitlines() if line.startswith('{"')]
    after_start = [r for r in records if r.get("event") == "published"]
    assert after_start and all({"role", "round", "model_version"} <= set(r) for r in after_start)

    status = daemon.final_status()
    assert status["scored"] == 48 and status["dead_lettered"] == 0
    assert status["judged"] == status["annotation_requests"] == len(selected)
    assert status["updates"] == len(updates)


def test_crash_and_redelivery_cost_no_second_judge_call_or_gradient_step(broker, topic_prefix, tmp_path):
    topics = Topics(topic_prefix)
    stream = _stream(24, "redo")
    gold = {t.problem: t.gold_first_error for t in stream}
    env = {"ACTPRM_SELECTION__STRATEGY": "full", "ACTPRM_JUDGE__KIND": "openai", "ACTPRM_JUDGE__CONCURRENCY": "2",
           "ACTPRM_JUDGE__MAX_RETRIES": "0", "ACTPRM_JUDGE__TIMEOUT_S": "30"}
    with FaultyJudge(gold, delay_s=0.05).start() as server:
        env["ACTPRM_JUDGE__BASE_URL"] = server.base_url
        daemon = Daemon(broker.bootstrap, topic_prefix, tmp_path, env=env).start()
        try:
            produce_trajectories(broker.bootstrap, topic_prefix, stream)
            everything_trained = lambda: all_consumed(daemon.store, {t.id for t in stream})
            wait_until(everything_trained, 240, what="all 24 labels trained")
            assert server.total() == 24 and max(server.calls.values()) == 1

            # A crash (no clean shutdown, offsets maybe uncommitted), then a restart on the same state.
            daemon.kill()
            daemon.start()
            # Everything is sent again: trajectories by a producer retrying, annotation requests
            # and labels as Kafka would redeliver them.
            requests = read_topic(broker.bootstrap, topics.annotations)
            labels = read_topic(broker.bootstrap, topics.labels)
            assert len({r.id for r in requests}) == 24 and len({l.id for l in labels}) == 24
            produce_trajectories(broker.bootstrap, topic_prefix, stream)
            _produce_raw(broker.bootstrap, topics.annotations, requests)
            _produce_raw(broker.bootstrap, topics.labels, labels)
            # 24 first labels + 24 sent by this test + 24 the judge sends again from its ledger.
            wait_until(lambda: len(read_topic(broker.bootstrap, topics.labels, settle_s=0.2)) >= 72, 120,
                       interval=2, what="the judge to re-send the stored labels")
            assert daemon.terminate(90) == 0, daemon.stderr()[-3000:]
        finally:
            daemon.kill()

    status = daemon.final_status()
    assert status["duplicates_skipped"] == 24  # the re-sent trajectories were not scored again
    assert server.total() == 24, f"second judge calls: {+server.calls - Counter(gold.keys())}"
    assert max(consumed_ids(daemon.store).values()) == 1
    assert status["updates"] == 0, "no label may be trained a second time"
    rewards = _rewards_for(broker.bootstrap, topics, {t.id for t in stream})
    assert {r.id for r in rewards} == {t.id for t in stream}


def _produce_raw(bootstrap: str, topic: str, items: list) -> None:
    import asyncio

    asyncio.run(publish(bootstrap, topic, items))


def _latest_assignment(daemon: Daemon) -> list[int]:
    """The trajectories partitions a scorer logged at its latest rebalance ([] before any)."""
    lines = [line for line in daemon.stderr().splitlines() if '"partitions assigned"' in line]
    return json.loads(lines[-1])["partitions"] if lines else []


def test_two_scorers_share_the_stream_and_the_budget_holds(broker, topic_prefix, tmp_path):
    topics = Topics(topic_prefix)
    shared = {"ACTPRM_CHECKPOINT_DIR": str(tmp_path / "checkpoints"), "ACTPRM_SELECTION__STRATEGY": "full",
              "ACTPRM_ROUND__BUDGET": "10"}
    keeper = Daemon(broker.bootstrap, topic_prefix, tmp_path / "trainer", "--role", "trainer,judge", env=shared).start()
    scorers = [Daemon(broker.bootstrap, topic_prefix, tmp_path / f"scorer{i}", "--role", "scorer", env=shared).start()
               for i in range(2)]
    stream = _stream(40, "scale")
    ids = {t.id for t in stream}
    try:
        for s in scorers:
            wait_until(lambda: '"serving"' in s.stderr(), 120, what="a scorer to load its model")
        # Both join the group and split its partitions before the stream starts (a join takes
        # session_timeout/2): each scorer's latest assignment is non-empty, and they do not overlap.
        def split() -> bool:
            shares = [_latest_assignment(s) for s in scorers]
            return all(shares) and not set(shares[0]) & set(shares[1])

        wait_until(split, 60, what="both scorers to hold partitions of the trajectories topic")
        produce_trajectories(broker.bootstrap, topic_prefix, stream)
        rewards = _rewards_for(broker.bootstrap, topics, ids, timeout_s=180)
        wait_until(lambda: len(read_topic(broker.bootstrap, topics.labels, settle_s=0.3)) >= 10, 120, interval=1,
                   what="the judge to label the budget's worth")
        finals = []
        for s in scorers:
            assert s.terminate(60) == 0, s.stderr()[-2000:]
            finals.append(s.final_status())
    finally:
        keeper.terminate(60)
        for d in (keeper, *scorers):
            d.kill()

    per_id = Counter(r.id for r in rewards)
    assert set(per_id) == ids and max(per_id.values()) == 1
    assert sum(f["scored"] for f in finals) == 40 and all(f["scored"] > 0 for f in finals), finals
    requests = read_topic(broker.bootstrap, topics.annotations)
    assert len({r.id for r in requests}) == 10  # 40 selected by two scorers, the budget let 10 through
    assert keeper.final_status()["budget_used"] == 10


def test_a_scorer_in_its_own_process_swaps_on_the_trainers_announcement(broker, topic_prefix, tmp_path):
    """The checkpoint poll is set to ten minutes, so only the versions topic can tell the scorer."""
    shared = {"ACTPRM_CHECKPOINT_DIR": str(tmp_path / "checkpoints"), "ACTPRM_SELECTION__STRATEGY": "full",
              "ACTPRM_UPDATE__BATCH_SIZE": "4", "ACTPRM_SCORER__VERSION_POLL_S": "600"}
    trainer = Daemon(broker.bootstrap, topic_prefix, tmp_path / "trainer", "--role", "trainer,judge", env=shared).start()
    scorer = Daemon(broker.bootstrap, topic_prefix, tmp_path / "scorer", "--role", "scorer", env=shared).start()
    try:
        wait_until(lambda: '"serving"' in scorer.stderr(), 120, what="the scorer to load its model")
        produce_trajectories(broker.bootstrap, topic_prefix, _stream(8, "announce"))
        wait_until(lambda: '"swapped"' in scorer.stderr(), 180, interval=0.5,
                   what="the scorer to swap to a version it was told of")
        assert scorer.terminate(60) == 0, scorer.stderr()[-2000:]
        final = scorer.final_status()
    finally:
        trainer.terminate(60)
        for d in (trainer, scorer):
            d.kill()
    assert final["swaps"] >= 1 and final["served_version"] >= 1 and final["swap_failures"] == 0, final
