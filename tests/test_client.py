"""RewardClient: plain helpers, then a real broker and a real scorer daemon on `tiny`."""

from __future__ import annotations

import asyncio
import time

import pytest

from actprm.daemon.settings import KafkaSettings
from actprm.client.kafka import (ItemError, RewardClient, RewardTimeout, StaleRewardError, reduce_steps,
                                   to_trajectory)
from actprm.client.messages import Reward
from helpers_daemon import Daemon, publish


def test_reductions():
    mu = [0.9, 0.5, 0.8]
    assert reduce_steps(mu) == 0.5 and reduce_steps(mu, "last") == 0.8
    assert reduce_steps(mu, "mean") == pytest.approx(2.2 / 3) and reduce_steps(mu, "prod") == pytest.approx(0.36)
    assert reduce_steps([], "min") == 0.0
    with pytest.raises(ValueError, match="unknown reduction 'max'"):
        reduce_steps(mu, "max")


def test_items_become_trajectories_with_fresh_ids():
    a = to_trajectory({"prompt": "2+2?", "response": "2+2=4\n\nSo 4."}, split="\n\n")
    b = to_trajectory({"problem": "2+2?", "steps": ["4"]}, split="\n\n")
    assert a.problem == "2+2?" and a.steps == ["2+2=4", "So 4."] and a.id != b.id
    assert to_trajectory({"prompt": "p", "response": "a\nb"}, split="lines").steps == ["a", "b"]
    with pytest.raises(ItemError, match="item 3: give steps"):
        to_trajectory({"problem": "p"}, split="\n\n", index=3)
    with pytest.raises(ItemError, match="give problem or prompt, not both"):
        to_trajectory({"problem": "p", "prompt": "p", "steps": ["x"]}, split="\n\n")
    with pytest.raises(ValueError, match="needs a Kafka broker"):
        RewardClient(KafkaSettings())


def _kafka(broker, prefix: str) -> KafkaSettings:
    return KafkaSettings(bootstrap=broker.bootstrap, topic_prefix=prefix, partitions=2)


def _reward(i: str, version: int) -> Reward:
    return Reward(id=i, mu=[0.5], sigma=[0.1], first_error=-1, selected=False, model_version=version, n_steps=1,
                  truncated=False, round_id=0)


@pytest.mark.broker
def test_timeout_names_missing_ids_and_repeats_and_old_versions_are_handled(broker, topic_prefix):
    """No scorer here: the test publishes the rewards itself, twice for one id, to see the client
    keep the first, refuse an old version, and name what never came."""
    async def scenario():
        async with RewardClient(_kafka(broker, topic_prefix)) as client:
            with pytest.raises(RewardTimeout) as missing:
                await client.score([{"id": "never-1", "problem": "p", "steps": ["x"]},
                                    {"id": "never-2", "problem": "p", "steps": ["y"]}], timeout_s=1.0)
            assert missing.value.missing == ["never-1", "never-2"] and "never-1, never-2" in str(missing.value)

            call = asyncio.create_task(client.score([{"id": "dup-1", "problem": "p", "steps": ["x"]}], timeout_s=30))
            await asyncio.sleep(0)  # the call registers its waiter before the rewards are published
            await publish(broker.bootstrap, client.topics.rewards, [_reward("dup-1", 3), _reward("dup-1", 4)])
            (got,) = await call
            assert got.model_version == 3  # the first reward for an id wins
            deadline = time.monotonic() + 10
            while client.stats["read"] < 2 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)

            call = asyncio.create_task(client.score([{"id": "old-1", "problem": "p", "steps": ["x"]}], timeout_s=30,
                                                    min_version=5))
            await asyncio.sleep(0)
            await publish(broker.bootstrap, client.topics.rewards, [_reward("old-1", 4)])
            with pytest.raises(StaleRewardError, match=r"old-1 \(v4\)"):
                await call
            with pytest.raises(ItemError, match="ids repeated in one call: x"):
                await client.score([{"id": "x", "problem": "p", "steps": ["a"]}] * 2)

    asyncio.run(scenario())


@pytest.mark.broker
@pytest.mark.slow
def test_64_concurrent_calls_each_get_their_own_rewards(broker, topic_prefix, tmp_path):
    daemon = Daemon(broker.bootstrap, topic_prefix, tmp_path, "--role", "scorer,trainer").start()

    def items(call: int) -> list[dict]:
        # A distinct step count per item, so a reward handed to the wrong caller shows in n_steps.
        out = []
        for j in range(8):
            n = 1 + (call * 8 + j) % 7
            steps = [f"step {k} of call {call} item {j}" for k in range(n)]
            out.append({"problem": f"problem {call}.{j}", "steps": steps} if j % 2 else
                       {"prompt": f"problem {call}.{j}", "response": "\n\n".join(steps)})
        return out

    async def scenario():
        async with RewardClient(_kafka(broker, topic_prefix)) as client:
            await client.score(items(999)[:1], timeout_s=180)  # the daemon is up and serving
            calls = [items(c) for c in range(64)]
            ts = [client.trajectories(batch) for batch in calls]
            results = await asyncio.gather(*(client.score_trajectories(t, timeout_s=180) for t in ts))
            return ts, results, client.stats

    try:
        ts, results, stats = asyncio.run(scenario())
    finally:
        daemon.terminate()
    assert len(results) == 64
    for sent, got in zip(ts, results):
        assert [r.id for r in got] == [t.id for t in sent]
        assert [r.n_steps for r in got] == [len(t.steps) for t in sent]
        assert all(len(r.mu) == len(t.steps) for r, t in zip(got, sent))
    assert len({r.id for got in results for r in got}) == 64 * 8
    assert stats["produced"] == 1 + 64 * 8
