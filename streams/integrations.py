"""Reward functions for RL trainers, a few lines each over the RewardClient.

- verl: `verl_compute_score(...)` is an `async def compute_score(data_source, solution_str,
  ground_truth, extra_info=None, **kwargs)` returning {"score": float, ...}.
- TRL (GRPO): `trl_reward_func(...)` is `f(prompts, completions, **kwargs) -> list[float]`
  (async by default; `sync=True` for TRL versions that only call plain functions).

Trainers call reward functions from threads, from their own event loops, or from a fresh
`asyncio.run` per batch, so the client lives on a private event loop in a daemon thread and
every caller shares its one Kafka connection and reader.

A response that cannot be split into steps (empty, or over the step limit) gets reward 0.0
instead of failing the training step: nothing in it was shown to be right.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import structlog

from actprm.streams.client import ItemError, RewardClient, reduce_steps
from actprm.streams.messages import Reward

log = structlog.get_logger("actprm")

EMPTY_REWARD = 0.0


class BackgroundRewardClient:
    """A RewardClient on its own event loop thread, started on first use; safe from any thread
    or event loop. `settings` is the daemon's Settings (or its kafka section), or a function
    returning them, called once on first use."""

    def __init__(self, settings: Any | Callable[[], Any], **client_options: Any):
        self._settings = settings
        self._options = client_options
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.client: RewardClient | None = None

    def _ensure(self) -> tuple[asyncio.AbstractEventLoop, RewardClient]:
        with self._lock:
            if self.client is None:
                settings = self._settings() if callable(self._settings) else self._settings
                client = RewardClient(settings, **self._options)
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=loop.run_forever, name="actprm-reward-client", daemon=True)
                thread.start()
                try:
                    asyncio.run_coroutine_threadsafe(client.start(), loop).result(timeout=120)
                except BaseException:
                    loop.call_soon_threadsafe(loop.stop)
                    raise
                self._loop, self._thread, self.client = loop, thread, client
            return self._loop, self.client

    def submit(self, items: Sequence[Mapping[str, Any]], **score_options: Any) -> concurrent.futures.Future:
        """Score on the client's loop; returns a concurrent future of [Reward | None] (None: unsplittable)."""
        loop, client = self._ensure()
        return asyncio.run_coroutine_threadsafe(_score_or_none(client, items, **score_options), loop)

    def score_sync(self, items: Sequence[Mapping[str, Any]], **score_options: Any) -> list[Reward | None]:
        return self.submit(items, **score_options).result()

    async def score(self, items: Sequence[Mapping[str, Any]], **score_options: Any) -> list[Reward | None]:
        if self.client is None:
            await asyncio.to_thread(self._ensure)  # the first start connects to Kafka: not on the caller's loop
        return await asyncio.wrap_future(self.submit(items, **score_options))

    def close(self) -> None:
        with self._lock:
            if self.client is None:
                return
            asyncio.run_coroutine_threadsafe(self.client.stop(), self._loop).result(timeout=30)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            self._loop.close()
            self.client = self._loop = self._thread = None


async def _score_or_none(client: RewardClient, items: Sequence[Mapping[str, Any]], **score_options: Any) -> list[Reward | None]:
    """Rewards in input order; an item that cannot become a trajectory is None (and not sent)."""
    trajectories, bad = [], []
    for i, item in enumerate(items):
        try:
            trajectories.append(client.trajectories([item])[0])
        except ItemError as err:
            trajectories.append(None)
            bad.append(f"{i}: {err}")
    if bad:
        log.warning("responses that cannot be split into steps get reward 0.0", n=len(bad), first=bad[0][:200])
    sent = [t for t in trajectories if t is not None]
    rewards = iter(await client.score_trajectories(sent, **score_options) if sent else [])
    return [next(rewards) if t is not None else None for t in trajectories]


def _text(message: Any, role: str) -> str:
    """Plain text of a TRL prompt or completion: a string, or a conversation (list of {role, content})."""
    if isinstance(message, str):
        return message
    if isinstance(message, Sequence) and all(isinstance(m, Mapping) for m in message):
        turns = [str(m.get("content", "")) for m in message if m.get("role") == role]
        return (turns[-1] if role == "user" else "\n\n".join(turns)) if turns else \
            "\n\n".join(str(m.get("content", "")) for m in message)
    return str(message)


def _verl_problem(extra_info: Any, kwargs: Mapping[str, Any]) -> str:
    """verl hands the reward function the response only; the problem rides in extra_info when the
    dataset's preprocessing put it there (verl's examples store it as "question")."""
    for source in (extra_info if isinstance(extra_info, Mapping) else {}, kwargs):
        for key in ("question", "problem", "prompt"):
            if isinstance(source.get(key), str):
                return source[key]
    return ""


def verl_compute_score(settings: Any | Callable[[], Any], *, reduce: str = "min", timeout_s: float = 120.0,
                       split: str = "\n\n", min_version: int | None = None) -> Callable:
    """verl's custom reward function (custom_reward_function.path / .name)."""
    reduce_steps([], reduce)  # refuse an unknown reduction now, not at the first sample
    shared = BackgroundRewardClient(settings, split=split)

    async def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs) -> dict:
        item = {"problem": _verl_problem(extra_info, kwargs), "response": solution_str}
        (r,) = await shared.score([item], timeout_s=timeout_s, min_version=min_version)
        if r is None:
            return {"score": EMPTY_REWARD, "prm_steps": 0, "prm_version": -1}
        return {"score": reduce_steps(r.mu, reduce), "prm_steps": r.n_steps, "prm_version": r.model_version}

    compute_score.client = shared
    return compute_score


def trl_reward_func(settings: Any | Callable[[], Any], *, reduce: str = "min", timeout_s: float = 120.0,
                    split: str = "\n\n", min_version: int | None = None, sync: bool = False,
                    name: str = "actprm_prm") -> Callable:
    """A TRL reward function (GRPOTrainer(reward_funcs=[...])); TRL logs it under `name`."""
    reduce_steps([], reduce)
    shared = BackgroundRewardClient(settings, split=split)

    def items(prompts, completions) -> list[dict]:
        return [{"problem": _text(p, "user"), "response": _text(c, "assistant")} for p, c in zip(prompts, completions)]

    def scalars(rewards: list[Reward | None]) -> list[float]:
        return [EMPTY_REWARD if r is None else reduce_steps(r.mu, reduce) for r in rewards]

    async def reward_async(prompts, completions, **kwargs) -> list[float]:
        return scalars(await shared.score(items(prompts, completions), timeout_s=timeout_s, min_version=min_version))

    def reward_sync(prompts, completions, **kwargs) -> list[float]:
        return scalars(shared.score_sync(items(prompts, completions), timeout_s=timeout_s, min_version=min_version))

    reward = reward_sync if sync else reward_async
    reward.__name__ = reward.__qualname__ = name
    reward.client = shared
    return reward
