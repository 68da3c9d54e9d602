"""TRL (GRPOTrainer) reward function over actprm.

    from actprm.client.trl import reward_func               # settings from ACTPRM_KAFKA__* / ACTPRM_GATEWAY__*
    trainer = GRPOTrainer(model=..., reward_funcs=[reward_func], ...)

`reward_func(prompts, completions, **kwargs) -> list[float | None]` is async (TRL 1.x runs
async reward functions on its own loop); TRL logs it as `rewards/actprm_prm` (a function from
`make_reward_func(name=...)` under its name). Prompts and completions may be strings or
conversations. A sample without a reward by the deadline is None, which TRL skips (its
advantage is 0), and the count goes to TRL's metrics as `actprm/fallbacks`: the run goes on
while the daemon is away.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from actprm.client.outcome import Outcome
from actprm.client.rewarder import Rewarder
from actprm.client.steps import message_text


def trl_values(rewarder: Rewarder, outcomes: list[Outcome], log_metric: Any = None) -> list[float | None]:
    if callable(log_metric):
        log_metric("actprm/fallbacks", float(sum(not o.ok for o in outcomes)))
    # A sample with no steps gets the fallback value, not None: the policy's output is empty,
    # and TRL should see it as no better than that; None is for "the PRM could not answer".
    return [rewarder.value(o) if o.ok or o.failure == "invalid" else None for o in outcomes]


def _items(prompts, completions) -> list[dict]:
    return [{"problem": message_text(p, "user"), "response": message_text(c, "assistant")}
            for p, c in zip(prompts, completions)]


def make_reward_func(settings: Any = None, *, name: str = "actprm_prm", **reward_overrides: Any) -> Callable:
    """A TRL reward function; reward_overrides are gateway.* settings (reduce, timeout_s, ...)."""
    rewarder = Rewarder(settings, **reward_overrides)

    async def reward(prompts, completions, **kwargs) -> list[float | None]:
        outcomes = await rewarder.outcomes(_items(prompts, completions))
        return trl_values(rewarder, outcomes, kwargs.get("log_metric"))

    reward.__name__ = reward.__qualname__ = name
    reward.rewarder = rewarder
    return reward


_default: Rewarder | None = None


async def reward_func(prompts, completions, **kwargs) -> list[float | None]:
    """The ready reward function: settings from the environment, read on the first call."""
    global _default
    if _default is None:
        _default = Rewarder()
    outcomes = await _default.outcomes(_items(prompts, completions))
    return trl_values(_default, outcomes, kwargs.get("log_metric"))


reward_func.__name__ = reward_func.__qualname__ = "actprm_prm"  # TRL logs it as rewards/actprm_prm
