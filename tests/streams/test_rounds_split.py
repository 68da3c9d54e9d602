"""Rounds with the documented scale-out: scorer, judge and trainer as three processes.

A scorer without a round keeper cannot know the round; the round a request belongs to is
decided where it is admitted, so after `reset-round` new ids are judged and trained in the
new round (they used to inherit round 0 from the scorer and be dropped as stale, for good).
"""

from __future__ import annotations

import pytest

from actprm.streams.tools.ctl_client import CtlError, send_command
from actprm.model.training.checkpoints import CheckpointStore
from actprm.client.messages import ControlCommand
from actprm.streams.tools.produce import produce_trajectories, synthetic_trajectories
from actprm.client.topics import Topics
from support.daemon import Daemon, consumed_ids, read_topic
from support.wait import wait_until

pytestmark = [pytest.mark.broker, pytest.mark.slow]


def test_reset_round_with_separate_scorer_judge_and_trainer_trains_the_new_rounds_labels(broker, topic_prefix, tmp_path):
    bs, topics = broker.bootstrap, Topics(topic_prefix)
    env = {"ACTPRM_CHECKPOINT_DIR": str(tmp_path / "checkpoints"), "ACTPRM_SELECTION__STRATEGY": "full"}
    procs = {role: Daemon(bs, topic_prefix, tmp_path / role, "--role", role, env=env) for role in ("trainer", "scorer", "judge")}
    stream = [t.model_copy(update={"id": f"split-{t.id}"}) for t in synthetic_trajectories(8, seed=3)]
    ids = {t.id for t in stream}
    store = CheckpointStore(tmp_path / "checkpoints")  # shared by the trainer and the scorer
    try:
        for d in procs.values():
            d.start()
        wait_until(lambda: store.latest() == 0, 120, interval=0.5, what="version 0")

        def reset() -> bool:
            try:
                acks = send_command(bs, topic_prefix, ControlCommand(command="reset-round", args={"budget": 100}),
                                    None, 5, expect=1)
            except CtlError:
                return False  # the trainer's control consumer is not up yet
            assert acks[0].ok, acks[0].message
            return True

        wait_until(reset, 120, interval=1, what="the trainer to obey reset-round")
        produce_trajectories(bs, topic_prefix, stream)
        wait_until(lambda: set(consumed_ids(store)) >= ids, 180, interval=1,
                   what="the new round's labels to be trained")
        acks = send_command(bs, topic_prefix, ControlCommand(command="status"), None, 20, expect=3)
        status = next(a.state for a in acks if a.role == "trainer")
    finally:
        for d in procs.values():
            d.terminate(60)
            d.kill()

    requests = [r for r in read_topic(bs, topics.annotations, settle_s=0.3) if r.id in ids]
    labels = [r for r in read_topic(bs, topics.labels, settle_s=0.3) if r.id in ids]
    assert {r.id for r in requests} == ids and {r.round_id for r in requests} == {1}
    assert {r.id for r in labels} == ids and {r.round_id for r in labels} == {1}
    assert status["round"] == 1 and status["labels_stale_round"] == 0 and status["budget_used"] == 8, status
