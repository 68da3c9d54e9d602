"""The ensemble PRM: per-step mu/sigma from E heads over ONE backbone pass."""

from __future__ import annotations

import itertools
import math
import statistics

import pytest
import torch

from actprm.model.prm import EnsembleHeads, EnsemblePRM, PRMConfig
from support.model import tiny_prm, torch_one_thread  # noqa: F401  (autouse fixture)

# Lengths deliberately out of order (long, short, mid, ...) so score()'s internal sort by
# length would scramble the results if it did not restore the input order.
TRAJ = [
    ("a long problem statement that takes many more tokens than the others " * 3, ["s0", "s1", "s2", "s3", "s4"]),
    ("p", ["only step"]),
    ("mid sized problem", ["first", "second", "third"]),
    ("tiny", ["x", "y"]),
    ("another fairly long problem, with words and words and words", ["one", "two", "three", "four"]),
    ("q", []),  # no steps: empty scores, still in place
]


@pytest.fixture(scope="module")
def prm():
    model = tiny_prm(8, score_batch_size=4)
    # Spread the heads' output biases so heads disagree clearly and mu moves across 0.5:
    # the random init gives every step mu ~ 0.51, which would make first_error and the
    # sigma checks trivial. This only sets weights; nothing of the code is replaced.
    with torch.no_grad():
        model.heads.b3.copy_(torch.linspace(-2.0, 2.0, 8).view(8, 1, 1))
    return model


@pytest.fixture(scope="module")
def scores(prm):
    return prm.score(TRAJ)


def test_mu_and_sample_sigma_are_recomputed_from_probs(prm, scores):
    E = prm.config.n_heads
    for (_, steps), sc in zip(TRAJ, scores):
        assert len(sc.probs) == E and all(len(row) == len(steps) for row in sc.probs)
        assert len(sc.mu) == len(sc.sigma) == len(steps)
        for i in range(len(steps)):
            column = [sc.probs[e][i] for e in range(E)]
            # mu = mean over heads; sigma = SAMPLE std over heads (divide by E-1), as the official
            # trainer's torch.std: the population std would select fewer near delta_std.
            assert sc.mu[i] == pytest.approx(statistics.fmean(column), abs=1e-6)
            assert sc.sigma[i] == pytest.approx(statistics.stdev(column), abs=1e-6)
            # and visibly not the population std (factor sqrt(E / (E - 1)) ~ 1.069 for E = 8)
            assert sc.sigma[i] != pytest.approx(statistics.pstdev(column), abs=1e-4)
            assert all(0.0 < p < 1.0 for p in column)


def test_single_head_sigma_is_zero(prm):
    one = EnsemblePRM(prm.backbone, PRMConfig(n_heads=1))
    [sc] = one.score([("p", ["a", "b"])])
    assert sc.sigma == [0.0, 0.0]
    assert sc.mu == pytest.approx([sc.probs[0][0], sc.probs[0][1]], abs=0)


def test_results_keep_the_input_order(prm, scores):
    for (problem, steps), sc in zip(TRAJ, scores):
        assert sc.n_steps == len(steps)
        assert sc.n_tokens == len(prm.encode(problem, steps).input_ids)
        assert not sc.truncated
    assert scores[-1].mu == [] and scores[-1].first_error == -1


def test_padded_batch_scores_equal_scoring_each_alone(prm, scores):
    # Right padding + attention mask + a causal model: padding must not move any score.
    for traj, batched in zip(TRAJ, scores):
        [alone] = prm.score([traj])
        assert batched.mu == pytest.approx(alone.mu, abs=1e-5)
        assert batched.sigma == pytest.approx(alone.sigma, abs=1e-5)
        for row_b, row_a in zip(batched.probs, alone.probs):
            assert row_b == pytest.approx(row_a, abs=1e-5)


def test_first_error_is_the_first_step_with_mu_below_threshold(prm, scores):
    def expected(mu, thr):
        return next((i for i, m in enumerate(mu) if m < thr), -1)

    for sc in scores:
        assert sc.first_error == expected(sc.mu, 0.5)
    # A threshold taken from the data itself so that some trajectory has a first error
    # that is not step 0 or -1: score again and check the same rule.
    mus = sorted(m for sc in scores for m in sc.mu)
    thr = mus[len(mus) // 2]
    again = prm.score(TRAJ, threshold=thr)
    firsts = [sc.first_error for sc in again]
    assert firsts == [expected(sc.mu, thr) for sc in again]
    assert any(f >= 0 for f in firsts) and -1 in firsts


def test_one_backbone_pass_for_all_heads(prm):
    """E heads cost one backbone forward per batch, whatever E is."""
    calls: list[int] = []
    head_rows: list[int] = []
    body_hook = prm.body.register_forward_hook(lambda m, args, kwargs, out: calls.append(1), with_kwargs=True)
    try:
        counts, rows = {}, {}
        for E in (1, 32):
            # Same backbone object; only the number of heads differs.
            model = EnsemblePRM(prm.backbone, PRMConfig(n_heads=E, score_batch_size=4))
            h = model.heads.register_forward_hook(lambda m, args, out: head_rows.append(args[0].shape[0]))
            calls.clear()
            head_rows.clear()
            model.score(TRAJ)
            h.remove()
            counts[E], rows[E] = len(calls), sum(head_rows)
    finally:
        body_hook.remove()
    # 6 trajectories in batches of 4 -> 2 backbone calls, for E = 1 and E = 32 alike.
    assert counts[1] == counts[32] == math.ceil(len(TRAJ) / 4)
    # The heads read the hidden states once (a row per real step), not copied E times.
    assert rows[1] == rows[32]


def test_heads_read_only_the_real_steps(prm):
    """Given each row's step count, the heads run on the real rows alone: the same logits there
    as on the padded batch, 0 at the padding."""
    B, S, H = 3, 5, prm.backbone.hidden_size
    at_steps = torch.randn(B, S, H)  # (B, S, H)
    n_steps = [5, 2, 3]
    rows: list[int] = []
    hook = prm.heads.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    try:
        padded = prm.head_logits(at_steps)  # (E, B, S)
        packed = prm.head_logits(at_steps, n_steps)  # (E, B, S)
    finally:
        hook.remove()
    assert rows == [B * S, sum(n_steps)]
    for b, n in enumerate(n_steps):
        torch.testing.assert_close(packed[:, b, :n], padded[:, b, :n])
        assert torch.all(packed[:, b, n:] == 0)


def test_heads_are_independently_initialised():
    model = tiny_prm(8)
    heads = model.heads
    for name in ("w1", "b1", "w2", "b2", "w3", "b3"):
        p = getattr(heads, name)
        for e, f in itertools.combinations(range(p.shape[0]), 2):
            assert not torch.equal(p[e], p[f]), f"heads {e} and {f} share {name}"
    # and they disagree on real inputs
    [sc] = model.score([("p", ["a", "b"])])
    assert len({round(sc.probs[e][0], 7) for e in range(8)}) == 8
    # The anchor (the init copy) equals the weights at start.
    assert heads.anchor_penalty() == 0.0


def test_head_init_is_deterministic_from_the_seed():
    a, b = tiny_prm(4), tiny_prm(4)
    assert torch.equal(a.heads.w1, b.heads.w1)
    c = EnsemblePRM(a.backbone, PRMConfig(n_heads=4, seed=1))
    assert not torch.equal(a.heads.w1, c.heads.w1)


def test_input_standardisation_hand_worked():
    heads = EnsembleHeads(2, 3, 4, seed=0)
    # Until set, the heads read the raw states.
    assert heads.input_shift.tolist() == [0, 0, 0] and heads.input_scale.tolist() == [1, 1, 1]
    assert int(heads.input_rows) == 0
    x = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 7.0]])
    raw = heads(x)
    heads.set_input_scaling(torch.tensor([[0.0, 1, 5], [2, 1, 5], [4, 1, 5]]))
    # mean (2, 1, 5); sample sd (2, 0, 0). The constant dimensions get the floor, 1% of the
    # mean sd (2/3): scale 1 / (2/300) = 150, not 1 / 0.
    assert heads.input_shift.tolist() == [2, 1, 5] and int(heads.input_rows) == 3
    torch.testing.assert_close(heads.input_scale, torch.tensor([0.5, 150.0, 150.0]))
    # The same MLPs now read (x - shift) * scale.
    standardised = torch.tensor([[-0.5, 150.0, -300.0], [-0.75, -300.0, 300.0]])
    torch.testing.assert_close(heads(x), EnsembleHeads(2, 3, 4, seed=0)(standardised))
    assert not torch.equal(raw, heads(x))
    with pytest.raises(ValueError):
        heads.set_input_scaling(torch.zeros((1, 3)))


def test_score_of_nothing_is_nothing(prm):
    assert prm.score([]) == []
