"""Which trajectories the ensemble is unsure of: the ActPRM rule and classic alternatives.

All rules look only at steps up to the first predicted error E(s): later steps do not change
where the judge would put the first error. Pure functions over plain lists, so they are
tested against hand-worked numbers.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, get_args


def predicted_first_error(mu: Iterable[float], threshold: float = 0.5) -> int:
    """The first step whose mean score is below threshold, -1 when every step passes (the
    ProcessBench convention; the one home of this rule: metrics, scoring and the daemon use it)."""
    for i, m in enumerate(mu):
        if m < threshold:
            return i
    return -1


def uncertainty_window(mu: Sequence[float], threshold: float = 0.5) -> int:
    """E(s): the last step index the rules look at (the first predicted error, else the last step)."""
    first = predicted_first_error(mu, threshold)
    return first if first >= 0 else len(mu) - 1


def is_aleatoric(mu: Sequence[float], delta_pred: float) -> bool:
    """Some step up to E(s) is predicted with confidence max(mu, 1 - mu) below delta_pred (the
    one home of "confident": a trajectory is confident when this is False)."""
    end = uncertainty_window(mu)
    return any(max(m, 1.0 - m) < delta_pred for m in mu[: end + 1])


def is_epistemic(mu: Sequence[float], sigma: Sequence[float], delta_std: float) -> bool:
    """Some step up to E(s) on which the heads disagree by more than delta_std."""
    end = uncertainty_window(mu)
    return any(s > delta_std for s in sigma[: end + 1])


def is_uncertain(mu: Sequence[float], sigma: Sequence[float], delta_pred: float, delta_std: float) -> bool:
    """ActPRM: send the trajectory to the judge when aleatoric OR epistemic."""
    return is_aleatoric(mu, delta_pred) or is_epistemic(mu, sigma, delta_std)


def first_error_distribution(p: Sequence[float]) -> list[float]:
    """One head's distribution of the label, the first wrong step, from its probabilities p
    (S,) that each step is correct: P(first error at k) = p_0 ... p_{k-1} (1 - p_k) for k < S,
    then P(no error) = p_0 ... p_{S-1}. (S + 1,); it sums to 1."""
    out, alive = [], 1.0
    for q in p:
        out.append(alive * (1.0 - q))
        alive *= q
    out.append(alive)
    return out


def entropy(dist: Sequence[float]) -> float:
    """In nats; 0 * log 0 = 0."""
    return -sum(x * math.log(x) for x in dist if x > 0.0)


def first_error_mutual_information(probs: Sequence[Sequence[float]]) -> float:
    """How much the heads disagree about the label itself (where the first error is): the
    mutual information between the label and the head, H(mean of P_e) - mean of H(P_e) over
    the E heads (BALD, Houlsby et al. 2011, with the heads as samples of the model). Heads that
    agree give 0 however unsure they are, so an ambiguous trajectory that one more label would
    not settle ranks low; confident heads that point at different steps rank high.
    probs: (E, S) per-head probabilities that each step is correct."""
    if not probs or not probs[0]:
        return 0.0
    dists = [first_error_distribution(p) for p in probs]  # (E, S + 1)
    mean = [sum(col) / len(dists) for col in zip(*dists)]  # (S + 1,)
    return max(0.0, entropy(mean) - sum(entropy(d) for d in dists) / len(dists))


class Scored(Protocol):
    mu: list[float]
    sigma: list[float]


class Selector(Protocol):
    name: str

    def select(self, scores: Sequence[Scored]) -> list[bool]: ...


@dataclass
class ActPRMSelector:
    delta_pred: float = 0.95  # the published thresholds (ActPRM)
    delta_std: float = 0.005
    name: str = "actprm"

    def select(self, scores: Sequence[Scored]) -> list[bool]:
        return [bool(s.mu) and is_uncertain(s.mu, s.sigma, self.delta_pred, self.delta_std) for s in scores]


@dataclass
class ConfidenceSelector:
    """Least confidence only (aleatoric part of the ActPRM rule)."""

    delta_pred: float = 0.95
    name: str = "confidence"

    def select(self, scores: Sequence[Scored]) -> list[bool]:
        return [bool(s.mu) and is_aleatoric(s.mu, self.delta_pred) for s in scores]


@dataclass
class DisagreementSelector:
    """Ensemble disagreement only (epistemic part of the ActPRM rule)."""

    delta_std: float = 0.005
    name: str = "disagreement"

    def select(self, scores: Sequence[Scored]) -> list[bool]:
        return [bool(s.mu) and is_epistemic(s.mu, s.sigma, self.delta_std) for s in scores]


class RandomSelector:
    """Each trajectory independently with probability rate: the equal-budget baseline."""

    name = "random"

    def __init__(self, rate: float, seed: int = 0):
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"random selection rate must be in [0, 1], got {rate}")
        self.rate = rate
        self._rng = random.Random(seed)

    def select(self, scores: Sequence[Scored]) -> list[bool]:
        return [bool(s.mu) and self._rng.random() < self.rate for s in scores]


class AllSelector:
    """Every trajectory (full-data training)."""

    name = "full"

    def select(self, scores: Sequence[Scored]) -> list[bool]:
        return [bool(s.mu) for s in scores]


Strategy = Literal["actprm", "random", "confidence", "disagreement", "full"]  # selection.strategy's values
STRATEGIES: tuple[str, ...] = get_args(Strategy)


def make_selector(
    name: str, *, delta_pred: float = 0.95, delta_std: float = 0.005, rate: float = 0.5, seed: int = 0
) -> Selector:
    if name == "actprm":
        return ActPRMSelector(delta_pred, delta_std)
    if name == "confidence":
        return ConfidenceSelector(delta_pred)
    if name == "disagreement":
        return DisagreementSelector(delta_std)
    if name == "random":
        return RandomSelector(rate, seed)
    if name == "full":
        return AllSelector()
    raise ValueError(f"unknown selection strategy {name!r}; choose one of {', '.join(STRATEGIES)}")
