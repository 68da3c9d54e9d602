"""OpenRLHF reward function over actprm, for `--reward.remote_url` given a Python file:

    --reward.remote_url $(python -c "import actprm.client.openrlhf as m; print(m.__file__)")

OpenRLHF then calls `reward_func(queries, prompts, labels)` from a thread, one sample at a time
(`SingleTurnAgentExecutor`); queries are prompt + response as decoded by OpenRLHF. The answer
has OpenRLHF's shape: {"rewards", "scores", "extra_logs"}, with `extra_logs` numeric only
(OpenRLHF turns every value into a tensor): prm_ok (1 or 0), prm_failure (0 none,
1 unavailable, 2 invalid sample, 3 stale), prm_steps, prm_sigma_max, prm_selected, prm_version.
A sample without a reward gets gateway.fallback_reward, never an error: OpenRLHF would retry
five times and then drop it. The same answer is what `actprm serve` sends to
`--reward.remote_url http://HOST:PORT/get_reward`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from actprm.client.outcome import Outcome
from actprm.client.rewarder import Rewarder


class QueryError(ValueError):
    """A query in which the response cannot be found."""


def split_query(query: str, prompt: str | None, marker: str | None = None) -> tuple[str, str]:
    """(problem, response) of one OpenRLHF sample: the query minus its prompt. OpenRLHF cuts a
    long prompt from the left before generating, so the query may start with the prompt's tail
    only; else the text after the last `marker` (e.g. the chat template's assistant header)."""
    if prompt is not None:
        if query.startswith(prompt):
            return prompt, query[len(prompt):]
        tail = _prompt_tail(query, prompt)
        if tail:
            return prompt, query[tail:]
    if marker and marker in query:
        cut = query.rindex(marker)
        return query[:cut], query[cut + len(marker):]
    if prompt is not None:
        raise QueryError("the query does not start with its prompt nor with a left-cut tail of it"
                         + ("" if marker else "; set gateway.response_marker to split it at the assistant's header"))
    raise QueryError("no prompt given and no gateway.response_marker set, so the response cannot be found in the query")


def _prompt_tail(query: str, prompt: str, min_chars: int = 16, max_garbled: int = 3) -> int:
    """Length of the head of `query` that is a left-cut tail of `prompt` (0: none of at least
    min_chars). A byte-level tokenizer may cut inside a character, which decodes as U+FFFD (or a
    stray byte's character): up to `max_garbled` characters before the tail may differ. Found by
    the prompt's last characters, so the search is linear in practice."""
    probe = prompt[-min_chars:]
    if len(prompt) < min_chars:
        return 0
    start = query.find(probe)
    while start != -1:
        end = start + len(probe)
        for skip in range(min(max_garbled, end - min_chars) + 1):
            if prompt.endswith(query[skip:end]):
                return end
        start = query.find(probe, start + 1)
    return 0


def openrlhf_answer(outcomes: Sequence[Outcome], how: str, fallback: float) -> dict:
    values = [o.value(how, fallback) for o in outcomes]
    r = [o.reward for o in outcomes]
    return {
        "rewards": values,
        "scores": values,  # the PRM's step scores are probabilities, so the reduction is in 0..1 already
        "extra_logs": {
            "prm_ok": [float(o.ok) for o in outcomes],
            "prm_failure": [float(o.failure_code) for o in outcomes],
            "prm_steps": [float(x.n_steps) if x else 0.0 for x in r],
            "prm_sigma_max": [max(x.sigma, default=0.0) if x else 0.0 for x in r],
            "prm_selected": [float(x.selected) if x else 0.0 for x in r],
            "prm_version": [float(x.model_version) if x else -1.0 for x in r],
        },
        "errors": [o.error or None for o in outcomes],  # not read by OpenRLHF; for logs and people
    }


def query_items(queries: Sequence[str], prompts: Sequence[str] | None, marker: str | None) -> tuple[list[dict | None], list[Outcome | None]]:
    """Per query: its item, or None and the Outcome saying why it cannot be split."""
    items, bad = [], []
    for i, query in enumerate(queries):
        try:
            problem, response = split_query(query, prompts[i] if prompts else None, marker)
            items.append({"problem": problem, "response": response})
            bad.append(None)
        except QueryError as err:
            items.append(None)
            bad.append(Outcome(None, "invalid", f"query {i}: {err}"))
    return items, bad


def merge(items: list[dict | None], bad: list[Outcome | None], scored: list[Outcome]) -> list[Outcome]:
    it = iter(scored)
    return [b if b is not None else next(it) for b in bad]


_default: Rewarder | None = None


def reward_func(queries: list[str], prompts: list[str], labels: list[Any] | None = None) -> dict:
    """OpenRLHF's `reward_func(queries, prompts, labels)`: settings from the environment."""
    global _default
    if _default is None:
        _default = Rewarder()
    items, bad = query_items(queries, prompts, _default.reward.response_marker)
    scored = _default.outcomes_sync([x for x in items if x is not None]) if any(x is not None for x in items) else []
    return openrlhf_answer(merge(items, bad, scored), _default.reward.reduce, _default.reward.fallback_reward)
