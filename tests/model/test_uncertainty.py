"""The ActPRM selection rule and its classic alternatives, on hand-worked numbers.

Rule (docs: shared/notes/actprm-method.md):
  E(s)       = first step i with mu_i < 0.5, else the last step
  aleatoric  = any i <= E(s) with max(mu_i, 1 - mu_i) < delta_pred
  epistemic  = any i <= E(s) with sigma_i > delta_std
  uncertain  = aleatoric OR epistemic          (published delta_pred=0.95, delta_std=0.005)
"""

from __future__ import annotations

import pytest

from actprm.model.uncertainty import (
    STRATEGIES,
    ActPRMSelector,
    AllSelector,
    ConfidenceSelector,
    DisagreementSelector,
    RandomSelector,
    entropy,
    first_error_distribution,
    first_error_mutual_information,
    is_aleatoric,
    is_epistemic,
    is_uncertain,
    make_selector,
    predicted_first_error,
    uncertainty_window,
)
from support.model import S

PUB_PRED, PUB_STD = 0.95, 0.005


# --- E(s) ------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "mu, expected",
    [
        ([0.9, 0.6, 0.4, 0.2], 2),  # 0.9, 0.6 pass; 0.4 < 0.5 is the first error
        ([0.1, 0.9], 0),  # the very first step can be the error
        ([0.9, 0.5, 0.7], -1),  # 0.5 is not < 0.5: no error at all
        ([0.9, 0.49999], 1),  # just under the threshold
        ([], -1),  # nothing to score
    ],
)
def test_predicted_first_error(mu, expected):
    assert predicted_first_error(mu) == expected


def test_predicted_first_error_uses_the_given_threshold():
    # threshold 0.7: 0.9 passes, 0.6 < 0.7 fails -> step 1 (with 0.5 it would be -1)
    assert predicted_first_error([0.9, 0.6, 0.8], threshold=0.7) == 1
    assert predicted_first_error([0.9, 0.6, 0.8]) == -1


@pytest.mark.parametrize(
    "mu, expected",
    [
        ([0.9, 0.6, 0.4, 0.2], 2),  # the first predicted error
        ([0.9, 0.8, 0.7], 2),  # no error -> the LAST step (index 2), not -1
        ([0.3], 0),
        ([0.8], 0),  # one passing step: last step is 0
        ([], -1),  # empty: an empty window (mu[: -1 + 1] == [])
    ],
)
def test_uncertainty_window(mu, expected):
    assert uncertainty_window(mu) == expected


# --- aleatoric ------------------------------------------------------------------------------

def test_aleatoric_counts_only_steps_up_to_the_first_predicted_error():
    # mu = [0.99, 0.02, 0.6]: E(s) = 1 (0.02 < 0.5).
    # confidences max(mu, 1-mu): step0 0.99, step1 0.98 -> both >= 0.95.
    # step2 has confidence 0.6 < 0.95 but lies AFTER E(s): it must not count.
    assert not is_aleatoric([0.99, 0.02, 0.6], PUB_PRED)
    # Same unsure 0.6 moved BEFORE the error: mu = [0.99, 0.6, 0.02], E(s) = 2,
    # step1 confidence 0.6 < 0.95 -> aleatoric.
    assert is_aleatoric([0.99, 0.6, 0.02], PUB_PRED)


def test_aleatoric_includes_the_error_step_itself():
    # mu = [0.99, 0.3]: E(s) = 1; confidence at step1 = max(0.3, 0.7) = 0.7 < 0.95.
    assert is_aleatoric([0.99, 0.3], PUB_PRED)
    # mu = [0.99, 0.01]: confident error (0.99 >= 0.95) -> not aleatoric.
    assert not is_aleatoric([0.99, 0.01], PUB_PRED)


def test_aleatoric_without_predicted_error_looks_at_every_step():
    # No mu < 0.5 -> window is the whole trajectory; last step 0.9 < 0.95 counts.
    assert is_aleatoric([0.99, 0.98, 0.9], PUB_PRED)
    assert not is_aleatoric([0.99, 0.98, 0.97], PUB_PRED)


def test_aleatoric_boundary_equal_to_threshold_is_not_below():
    # max(0.95, 1 - 0.95) = max(0.95, 0.050000000000000044) = 0.95 exactly; 0.95 < 0.95 is False.
    assert not is_aleatoric([0.95], 0.95)
    # 0.25 and 0.75 are exact in binary: max(0.25, 0.75) = 0.75, not < 0.75.
    assert not is_aleatoric([0.99, 0.25], 0.75)
    # Just inside: confidence 0.9499 < 0.95.
    assert is_aleatoric([0.9499], 0.95)


# --- epistemic ------------------------------------------------------------------------------

def test_epistemic_counts_only_steps_up_to_the_first_predicted_error():
    # mu = [0.99, 0.01, 0.99]: E(s) = 1. sigma at step2 = 0.5 is after E(s): ignored.
    assert not is_epistemic([0.99, 0.01, 0.99], [0.001, 0.001, 0.5], PUB_STD)
    # The same disagreement at step1 (= E(s)) counts: 0.5 > 0.005.
    assert is_epistemic([0.99, 0.01, 0.99], [0.001, 0.5, 0.001], PUB_STD)


def test_epistemic_boundary_equal_to_threshold_is_not_above():
    # 0.005 > 0.005 is False; 0.0051 > 0.005 is True.
    assert not is_epistemic([0.99, 0.99], [0.005, 0.005], 0.005)
    assert is_epistemic([0.99, 0.99], [0.005, 0.0051], 0.005)
    # exact binary values: 0.25 > 0.25 False
    assert not is_epistemic([0.99], [0.25], 0.25)


# --- OR rule ---------------------------------------------------------------------------------

def test_or_rule():
    confident, calm = [0.99, 0.98], [0.001, 0.002]  # conf >= 0.95 and sigma <= 0.005 everywhere
    unsure = [0.99, 0.7]  # step1 confidence 0.7 < 0.95 (E(s) = last = 1)
    noisy = [0.001, 0.02]  # step1 sigma 0.02 > 0.005
    assert not is_uncertain(confident, calm, PUB_PRED, PUB_STD)  # neither
    assert is_uncertain(unsure, calm, PUB_PRED, PUB_STD)  # aleatoric only
    assert is_uncertain(confident, noisy, PUB_PRED, PUB_STD)  # epistemic only
    assert is_uncertain(unsure, noisy, PUB_PRED, PUB_STD)  # both


def test_empty_mu_is_never_uncertain():
    assert not is_aleatoric([], PUB_PRED)
    assert not is_epistemic([], [], PUB_STD)
    assert not is_uncertain([], [], PUB_PRED, PUB_STD)


# --- the heads' disagreement about the label ---------------------------------------------------


def test_first_error_distribution_hand_worked():
    # p = [0.5, 0.5]: wrong at step 0 w.p. 0.5; right then wrong at 1: 0.25; both right: 0.25
    assert first_error_distribution([0.5, 0.5]) == [0.5, 0.25, 0.25]
    assert first_error_distribution([0.9, 0.2]) == pytest.approx([0.1, 0.72, 0.18])
    assert first_error_distribution([]) == [1.0]  # nothing to get wrong


def test_entropy_hand_worked():
    assert entropy([0.5, 0.5]) == pytest.approx(0.693147, abs=1e-6)  # ln 2
    assert entropy([1.0, 0.0]) == 0.0


def test_mutual_information_is_zero_when_the_heads_agree_however_unsure():
    assert first_error_mutual_information([[0.5, 0.5]] * 4) == pytest.approx(0.0, abs=1e-12)
    assert first_error_mutual_information([]) == 0.0


def test_mutual_information_hand_worked():
    # One step; head A says right with 0.9, head B with 0.1. P_A = [0.1, 0.9], P_B = [0.9, 0.1],
    # their mean [0.5, 0.5]: ln 2 - (-(0.1 ln 0.1 + 0.9 ln 0.9)) = 0.693147 - 0.325083
    assert first_error_mutual_information([[0.9], [0.1]]) == pytest.approx(0.368064, abs=1e-6)


def test_confident_heads_that_disagree_outrank_agreeing_unsure_ones():
    ambiguous = [[0.6, 0.6, 0.6]] * 2  # both heads unsure, in the same way
    split = [[0.99, 0.01, 0.99], [0.99, 0.99, 0.01]]  # sure, but of different first errors
    assert first_error_mutual_information(split) > first_error_mutual_information(ambiguous)


# --- selectors -------------------------------------------------------------------------------

# A fixed panel of trajectories, with what each rule must say (published thresholds):
#   sure:     mu [0.99, 0.98] sigma [0.001, 0.001] -> neither
#   aleat:    mu [0.99, 0.70] sigma [0.001, 0.001] -> 0.70 < 0.95, sigma fine
#   epist:    mu [0.99, 0.98] sigma [0.001, 0.010] -> 0.010 > 0.005, confidences fine
#   late:     mu [0.99, 0.01, 0.6] sigma [0.001, 0.001, 0.9] -> unsure only AFTER E(s)=1
#   empty:    mu []                                -> never selected (nothing to label)
PANEL = {
    "sure": S([0.99, 0.98], [0.001, 0.001]),
    "aleat": S([0.99, 0.70], [0.001, 0.001]),
    "epist": S([0.99, 0.98], [0.001, 0.010]),
    "late": S([0.99, 0.01, 0.6], [0.001, 0.001, 0.9]),
    "empty": S([], []),
}


def _picked(selector) -> set[str]:
    names = list(PANEL)
    return {n for n, keep in zip(names, selector.select([PANEL[n] for n in names])) if keep}


def test_actprm_selector_is_the_or_rule_with_published_thresholds():
    sel = ActPRMSelector()
    assert (sel.delta_pred, sel.delta_std) == (0.95, 0.005)  # published defaults
    assert _picked(sel) == {"aleat", "epist"}


def test_confidence_selector_is_aleatoric_only():
    assert ConfidenceSelector().delta_pred == 0.95
    assert _picked(ConfidenceSelector()) == {"aleat"}


def test_disagreement_selector_is_epistemic_only():
    assert DisagreementSelector().delta_std == 0.005
    assert _picked(DisagreementSelector()) == {"epist"}


def test_selector_thresholds_are_settings():
    # Library defaults 0.9 / 0.01: aleat (0.70 < 0.9) still picked, epist (0.010 > 0.01 False) not.
    assert _picked(ActPRMSelector(delta_pred=0.9, delta_std=0.01)) == {"aleat"}
    # A looser confidence bar 0.6: 0.70 >= 0.6 -> nothing aleatoric.
    assert _picked(ConfidenceSelector(delta_pred=0.6)) == set()


def test_full_selector_takes_every_scored_trajectory():
    assert _picked(AllSelector()) == {"sure", "aleat", "epist", "late"}


def test_random_selector_rate_zero_and_one():
    assert _picked(RandomSelector(0.0)) == set()
    assert _picked(RandomSelector(1.0)) == {"sure", "aleat", "epist", "late"}  # empty still skipped


def test_random_selector_rate_half_over_many_samples():
    scores = [S([0.99], [0.0])] * 4000
    picks = RandomSelector(0.5, seed=123).select(scores)
    # Binomial(4000, 0.5): std = sqrt(4000 * 0.25) ~ 31.6 -> +-0.05 is ~6 std wide.
    assert abs(sum(picks) / len(picks) - 0.5) < 0.05
    # Seeded: the same seed picks the same trajectories.
    assert RandomSelector(0.5, seed=123).select(scores) == picks
    assert RandomSelector(0.5, seed=124).select(scores) != picks


@pytest.mark.parametrize("rate", [-0.1, 1.5])
def test_random_selector_rejects_a_rate_outside_0_1(rate):
    with pytest.raises(ValueError):
        RandomSelector(rate)


def test_make_selector_builds_each_strategy_with_published_defaults():
    for name in STRATEGIES:
        assert make_selector(name).name == name
    sel = make_selector("actprm")
    assert (sel.delta_pred, sel.delta_std) == (0.95, 0.005)
    assert make_selector("actprm", delta_pred=0.9, delta_std=0.01).delta_std == 0.01
    assert make_selector("random", rate=0.25).rate == 0.25


def test_make_selector_unknown_name():
    with pytest.raises(ValueError, match="unknown selection strategy 'entropyy'") as info:
        make_selector("entropyy")
    # The message lists the valid choices for the CLI.
    for name in STRATEGIES:
        assert name in str(info.value)
