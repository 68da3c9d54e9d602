"""verl and TRL adapters, called the way those trainers call them, against a real broker and a
real scorer daemon on `tiny`."""

from __future__ import annotations

import asyncio
import inspect
import threading

import pytest

from actprm.daemon.settings import KafkaSettings
from actprm.streams.integrations import _text, _verl_problem, trl_reward_func, verl_compute_score
from helpers_daemon import Daemon


def test_text_of_plain_and_conversational_samples():
    assert _text("2+2?", "user") == "2+2?"
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    assert _text(prompt, "user") == "2+2?"
    assert _text([{"role": "assistant", "content": "4\n\nSo 4."}], "assistant") == "4\n\nSo 4."
    assert _verl_problem({"question": "2+2?", "index": 3}, {}) == "2+2?" and _verl_problem(None, {}) == ""


def test_unknown_reduction_is_refused_at_once():
    with pytest.raises(ValueError, match="unknown reduction 'max'"):
        trl_reward_func(KafkaSettings(bootstrap="127.0.0.1:1"), reduce="max")


@pytest.mark.broker
@pytest.mark.slow
def test_verl_and_trl_adapters_over_a_real_daemon(broker, topic_prefix, tmp_path):
    daemon = Daemon(broker.bootstrap, topic_prefix, tmp_path, "--role", "scorer,trainer").start()
    kafka = lambda: KafkaSettings(bootstrap=broker.bootstrap, topic_prefix=topic_prefix, partitions=2)  # noqa: E731
    compute_score = verl_compute_score(kafka, timeout_s=180)
    grpo_reward = trl_reward_func(kafka, timeout_s=180)
    grpo_reward_sync = trl_reward_func(kafka, timeout_s=180, sync=True, reduce="mean")
    try:
        # verl: an async function with its exact parameters, called with keywords from its reward
        # manager, here from two separate event loops (asyncio.run each time).
        assert list(inspect.signature(compute_score).parameters) == [
            "data_source", "solution_str", "ground_truth", "extra_info", "kwargs"]
        assert inspect.iscoroutinefunction(compute_score)
        for _ in range(2):
            got = asyncio.run(compute_score(data_source="openai/gsm8k", solution_str="2+2 = 4.\n\nSo \\boxed{4}.",
                                            ground_truth="4", extra_info={"question": "What is 2+2?", "index": 0}))
            assert 0.0 <= got["score"] <= 1.0 and got["prm_steps"] == 2 and got["prm_version"] == 0
        assert asyncio.run(compute_score("x", "   ", "4"))["score"] == 0.0  # nothing to split: no steps were right

        # TRL GRPO: f(prompts, completions, **kwargs) -> list[float], plain and conversational.
        prompts = ["What is 1+1?", "What is 2*3?", "What is 5-2?"]
        completions = ["1+1 = 2.\n\nSo 2.", "2*3 = 6.", ""]
        kwargs = {"completion_ids": [[1], [2], [3]], "answer": ["2", "6", "3"]}
        rewards = asyncio.run(grpo_reward(prompts=prompts, completions=completions, **kwargs))
        assert len(rewards) == 3 and all(0.0 <= r <= 1.0 for r in rewards) and rewards[2] == 0.0
        assert grpo_reward.__name__ == "actprm_prm"
        conv_prompts = [[{"role": "user", "content": p}] for p in prompts]
        conv_completions = [[{"role": "assistant", "content": c}] for c in completions]
        # TRL's sync path calls reward functions from its training thread.
        out: list = []
        worker = threading.Thread(target=lambda: out.append(grpo_reward_sync(conv_prompts, conv_completions, **kwargs)))
        worker.start()
        worker.join(200)
        assert len(out[0]) == 3 and all(0.0 <= r <= 1.0 for r in out[0]) and out[0][2] == 0.0
    finally:
        for f in (compute_score, grpo_reward, grpo_reward_sync):
            f.client.close()
        daemon.terminate()
