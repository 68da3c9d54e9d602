"""The TRL, verl and OpenRLHF adapters (actprm.client.trl / verl / openrlhf), called the way
those trainers call them, against a real broker and a real scorer daemon on `tiny`. Each
framework's own code calls them in tests/client/test_rl_frameworks.py, in the framework's virtualenv."""

from __future__ import annotations

import asyncio
import inspect
import threading

import pytest

from actprm.client import openrlhf as openrlhf_adapter
from actprm.client import trl as trl_adapter
from actprm.client import verl as verl_adapter
from actprm.client.settings import ClientSettings, KafkaSettings, RewardSettings
from actprm.client.verl import make_compute_score, verl_problem
from support.daemon import Daemon


def test_verl_problem_comes_from_extra_info_in_any_shape():
    assert verl_problem({"question": "2+2?", "index": 3}, {}) == "2+2?"
    assert verl_problem({"prompt": [{"role": "user", "content": "3+3?"}]}, {}) == "3+3?"
    assert verl_problem(None, {"problem": "4+4?"}) == "4+4?" and verl_problem(None, {}) is None


def test_unknown_reduction_is_refused_at_once():
    with pytest.raises(ValueError, match="reduce"):
        trl_adapter.make_reward_func(ClientSettings(kafka=KafkaSettings(bootstrap="127.0.0.1:1")), reduce="max")


@pytest.mark.broker
@pytest.mark.slow
def test_verl_trl_and_openrlhf_adapters_over_a_real_daemon(broker, topic_prefix, tmp_path, monkeypatch):
    daemon = Daemon(broker.bootstrap, topic_prefix, tmp_path, "--role", "scorer,trainer").start()
    settings = ClientSettings(kafka=KafkaSettings(bootstrap=broker.bootstrap, topic_prefix=topic_prefix, partitions=2),
                              gateway=RewardSettings(timeout_s=180))
    # The ready functions read the environment, as a user's trainer would set it.
    monkeypatch.setenv("ACTPRM_KAFKA__BOOTSTRAP", broker.bootstrap)
    monkeypatch.setenv("ACTPRM_KAFKA__TOPIC_PREFIX", topic_prefix)
    monkeypatch.setenv("ACTPRM_GATEWAY__TIMEOUT_S", "180")
    monkeypatch.setenv("ACTPRM_GATEWAY__REDUCE", "mean")
    mean_score = make_compute_score(settings, reduce="mean")
    closers = [mean_score.rewarder]
    try:
        # verl: an async function with its exact parameters, called with keywords from its reward
        # loop, here from two separate event loops (asyncio.run each time).
        compute_score = verl_adapter.compute_score
        assert list(inspect.signature(compute_score).parameters) == [
            "data_source", "solution_str", "ground_truth", "extra_info", "kwargs"]
        assert inspect.iscoroutinefunction(compute_score)
        for _ in range(2):
            got = asyncio.run(compute_score(data_source="openai/gsm8k", solution_str="2+2 = 4.\n\nSo \\boxed{4}.",
                                            ground_truth="4", extra_info={"question": "What is 2+2?", "index": 0}))
            assert set(got) == {"score", "ok", "prm_steps", "prm_version"}
            assert got["ok"] and 0.0 <= got["score"] <= 1.0 and got["prm_steps"] == 2 and got["prm_version"] == 0
        closers.append(verl_adapter._default.rewarder)
        empty = asyncio.run(compute_score("x", "   ", "4", extra_info={"question": "q"}))
        assert empty == {"score": 0.0, "ok": False, "prm_steps": 0, "prm_version": -1}  # same keys, ok false
        # The reduction comes from the settings (gateway.reduce): mean of the same scores.
        m = asyncio.run(mean_score("x", "2+2 = 4.\n\nSo \\boxed{4}.", "4", extra_info={"question": "What is 2+2?"}))
        assert m["ok"] and m["prm_steps"] == 2

        # TRL GRPO: async f(prompts, completions, **kwargs) -> list[float | None], plain and conversational.
        prompts = ["What is 1+1?", "What is 2*3?", "What is 5-2?"]
        completions = ["1+1 = 2.\n\nSo 2.", "2*3 = 6.", ""]
        logged: dict = {}
        kwargs = {"completion_ids": [[1], [2], [3]], "answer": ["2", "6", "3"],
                  "log_metric": lambda name, value: logged.__setitem__(name, value)}
        rewards = asyncio.run(trl_adapter.reward_func(prompts=prompts, completions=completions, **kwargs))
        closers.append(trl_adapter._default)
        assert len(rewards) == 3 and all(0.0 <= r <= 1.0 for r in rewards) and rewards[2] == 0.0  # empty: fallback value
        assert logged == {"actprm/fallbacks": 1.0}
        conv_prompts = [[{"role": "user", "content": p}] for p in prompts]
        conv_completions = [[{"role": "assistant", "content": c or None}] for c in completions]
        # TRL runs async reward functions on its own loop in another thread.
        out: list = []
        worker = threading.Thread(target=lambda: out.append(asyncio.run(trl_adapter.reward_func(conv_prompts, conv_completions))))
        worker.start()
        worker.join(200)
        assert out[0][:2] == rewards[:2] and out[0][2] == 0.0

        # OpenRLHF's file mode: reward_func(queries, prompts, labels), from a thread, one sample.
        prompt = "<|im_start|>user\nWhat is 1+1?<|im_end|>\n<|im_start|>assistant\n"
        answer = openrlhf_adapter.reward_func([prompt + "1+1 = 2.\n\nSo 2."], [prompt], ["2"])
        closers.append(openrlhf_adapter._default)
        assert answer["extra_logs"]["prm_ok"] == [1.0] and answer["extra_logs"]["prm_steps"] == [2.0]
        assert 0.0 <= answer["rewards"][0] <= 1.0
    finally:
        for r in closers:
            r.close()
        daemon.terminate()
