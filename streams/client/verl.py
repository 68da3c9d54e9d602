"""verl reward function over actprm (verl 0.9: the reward loop's custom reward function).

Point verl at this file (no file of your own needed):

    reward.custom_reward_function.path=$(python -c "import actprm.client.verl as m; print(m.__file__)")
    reward.custom_reward_function.name=compute_score

`compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs)` is async and
returns {"score", "ok", "prm_steps", "prm_version"}: every sample has the same keys (verl
collects each key across the batch). Without a reward by the deadline, "score" is
gateway.fallback_reward and "ok" is False. verl hands the function the response only; the
problem is read from extra_info["question"] (or "problem", "prompt"), which verl's example
preprocessing writes: keep it in your dataset's extra_info. A sample without one is scored
with an empty problem, and warned about once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from actprm.client.outcome import Outcome
from actprm.client.rewarder import Rewarder
from actprm.client.steps import message_text

log = logging.getLogger("actprm.client")

PROBLEM_KEYS = ("question", "problem", "prompt")


def verl_problem(extra_info: Any, kwargs: Mapping[str, Any]) -> str | None:
    """The problem of a verl sample: from extra_info (or a keyword), a string or chat messages."""
    for source in (extra_info if isinstance(extra_info, Mapping) else {}, kwargs):
        for key in PROBLEM_KEYS:
            if source.get(key) is not None:
                return message_text(source[key], "user")
    return None


def verl_result(rewarder: Rewarder, outcome: Outcome) -> dict:
    r = outcome.reward
    return {"score": rewarder.value(outcome), "ok": outcome.ok,
            "prm_steps": r.n_steps if r is not None else 0, "prm_version": r.model_version if r is not None else -1}


def make_compute_score(settings: Any = None, **reward_overrides: Any) -> Callable:
    """A verl compute_score with its own settings; reward_overrides are gateway.* settings."""
    rewarder = Rewarder(settings, **reward_overrides)
    warned: list[bool] = []

    async def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs) -> dict:
        problem = verl_problem(extra_info, kwargs)
        if problem is None and not warned:
            warned.append(True)
            log.warning("actprm verl: a sample has no question in extra_info (keys tried: %s); it is scored with an "
                        "empty problem. Keep the question in your dataset's extra_info.", ", ".join(PROBLEM_KEYS))
        item = {"problem": problem or "", "response": solution_str}
        index = extra_info.get("index") if isinstance(extra_info, Mapping) else None
        if index is not None:
            item["key"] = index
        (outcome,) = await rewarder.outcomes([item])
        return verl_result(rewarder, outcome)

    compute_score.rewarder = rewarder
    return compute_score


_default: Callable | None = None


async def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs) -> dict:
    """The ready reward function: settings from the environment, read on the first call."""
    global _default
    if _default is None:
        _default = make_compute_score()
    return await _default(data_source, solution_str, ground_truth, extra_info, **kwargs)
