"""Encoding (problem, steps) into ids with one separator after each step, truncation, collate."""

from __future__ import annotations

import pytest
import torch

from actprm.model.backbone import SEP_TOKEN
from actprm.model.prm import EnsemblePRM, PRMConfig
from actprm.model.steps import collate, encode_trajectory
from support.model import tiny_prm, torch_one_thread  # noqa: F401  (autouse fixture)

STEPS = ["s0 first we add", "s1 then multiply", "s2 now simplify", "s3 so the answer is 4"]


@pytest.fixture(scope="module")
def prm():
    return tiny_prm(4)


@pytest.fixture(scope="module")
def tok(prm):
    return prm.backbone.tokenizer


@pytest.fixture(scope="module")
def sep(prm):
    return prm.backbone.sep_token_id


def _enc(tok, sep, problem, steps, max_length=2048):
    return encode_trajectory(tok, sep, problem, steps, max_length)


def test_separator_follows_every_step_and_positions_point_at_it(tok, sep):
    e = _enc(tok, sep, "What is 2+2?", STEPS)
    assert e.n_steps == e.n_scored == 4 and not e.truncated
    assert [e.input_ids[p] for p in e.step_positions] == [sep] * 4
    # The separator ids are exactly at the recorded positions, nowhere else.
    assert [i for i, t in enumerate(e.input_ids) if t == sep] == e.step_positions
    # Each step's text sits right before its separator.
    assert tok.decode(e.input_ids[: e.step_positions[0]]).endswith(STEPS[0])


def test_typed_separator_string_never_creates_a_phantom_step(tok, sep):
    # The literal "<extra_0>" in the problem and inside steps must stay plain text.
    problem = f"Why is {SEP_TOKEN} here? {SEP_TOKEN}"
    steps = [f"a {SEP_TOKEN} b", SEP_TOKEN, f"c{SEP_TOKEN}{SEP_TOKEN}d"]
    e = _enc(tok, sep, problem, steps)
    assert e.input_ids.count(sep) == len(steps) == e.n_scored
    assert [i for i, t in enumerate(e.input_ids) if t == sep] == e.step_positions
    # The typed text survives as text.
    text = tok.decode(e.input_ids)
    assert f"Why is {SEP_TOKEN} here?" in text and f"c{SEP_TOKEN}{SEP_TOKEN}d" in text


def test_typed_chat_special_tokens_stay_plain_text(tok, sep):
    # A step that types "<|im_end|>" must not close the assistant turn early.
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    plain = _enc(tok, sep, "p", ["x", "y"])
    typed = _enc(tok, sep, "p <|im_end|>", ["x <|im_end|>", "y"])
    assert typed.input_ids.count(im_end) == plain.input_ids.count(im_end)


def test_scored_separators_match_the_step_count_end_to_end(prm):
    # Through the PRM: a typed separator does not add a score either.
    [sc] = prm.score([(f"q {SEP_TOKEN}", [f"one {SEP_TOKEN} two", "three"])])
    assert len(sc.mu) == len(sc.sigma) == 2 and sc.n_steps == 2


def test_no_steps(tok, sep):
    e = _enc(tok, sep, "p", [])
    assert e.n_scored == 0 and e.n_steps == 0 and not e.truncated
    assert sep not in e.input_ids


def test_truncation_drops_whole_trailing_steps(tok, sep):
    full = _enc(tok, sep, "What is 2+2?", STEPS)
    # Room for exactly steps 0 and 1 (step 1's separator is the last id that fits) plus a
    # few ids that are too few for step 2 and its separator.
    max_length = full.step_positions[1] + 1 + 3
    e = _enc(tok, sep, "What is 2+2?", STEPS, max_length)
    assert e.truncated and e.n_steps == 4 and e.n_scored == 2
    assert e.step_positions == full.step_positions[:2]
    assert len(e.input_ids) <= max_length
    # Nothing of step 2 was kept: the ids end with step 1's separator.
    assert e.input_ids == full.input_ids[: full.step_positions[1] + 1]


def test_all_steps_fit_exactly_is_not_truncated(tok, sep):
    full = _enc(tok, sep, "What is 2+2?", STEPS)
    # max_length = up to the last separator: every step fits; only the closing chat tokens
    # (which carry no score) are cut.
    max_length = full.step_positions[-1] + 1
    e = _enc(tok, sep, "What is 2+2?", STEPS, max_length)
    assert not e.truncated and e.n_scored == 4
    assert e.step_positions == full.step_positions
    assert len(e.input_ids) == max_length
    # Untouched when the limit is large.
    assert len(full.input_ids) > max_length


def test_prompt_longer_than_max_length_still_respects_max_length(tok, sep):
    e = _enc(tok, sep, "x" * 500, ["a", "b"], max_length=200)
    assert e.truncated and e.n_scored == 0
    assert len(e.input_ids) <= 200


def test_truncated_scores_line_up_with_the_kept_steps(prm, tok, sep):
    problem = "What is 2+2?"
    full = _enc(tok, sep, problem, STEPS)
    short_len = full.step_positions[1] + 1 + 3  # keeps steps 0 and 1
    # Same backbone and the same head weights; only max_length differs.
    short_prm = EnsemblePRM(prm.backbone, PRMConfig(n_heads=4, max_length=short_len), heads=prm.heads)
    [long_sc] = prm.score([(problem, STEPS)])
    [short_sc] = short_prm.score([(problem, STEPS)])
    assert not long_sc.truncated and short_sc.truncated
    assert abs(long_sc.mu[0] - long_sc.mu[1]) > 1e-5  # steps distinguishable, see below
    assert short_sc.n_steps == 4 and len(short_sc.mu) == 2 and len(short_sc.probs[0]) == 2
    # The backbone is causal: the hidden state at step i's separator only sees ids before it,
    # so the kept steps score exactly as in the untruncated run (and the dropped steps
    # differ from each other, so an off-by-one alignment would show).
    assert short_sc.mu == pytest.approx(long_sc.mu[:2], abs=1e-6)
    assert short_sc.sigma == pytest.approx(long_sc.sigma[:2], abs=1e-6)


def test_collate_pads_and_masks(tok, sep):
    a = _enc(tok, sep, "a much longer problem statement here", ["x", "y", "z"])
    b = _enc(tok, sep, "p", ["only"])
    pad = tok.pad_token_id
    batch = collate([a, b], pad)
    T = max(len(a.input_ids), len(b.input_ids))
    assert batch.input_ids.shape == batch.attention_mask.shape == (2, T)
    assert batch.step_positions.shape == batch.step_mask.shape == (2, 3)
    assert batch.step_mask.dtype == torch.bool
    # Right padding with the pad id, and the mask marks exactly the real tokens.
    for row, e in enumerate([a, b]):
        n = len(e.input_ids)
        assert batch.input_ids[row, :n].tolist() == e.input_ids
        assert (batch.input_ids[row, n:] == pad).all()
        assert batch.attention_mask[row].tolist() == [1] * n + [0] * (T - n)
    assert batch.step_mask.tolist() == [[True, True, True], [True, False, False]]
    assert batch.step_positions[0].tolist() == a.step_positions
    assert batch.step_positions[1].tolist() == [b.step_positions[0], 0, 0]  # 0 where masked


def test_collate_with_no_scored_step_keeps_one_masked_column(tok, sep):
    e = _enc(tok, sep, "p", [])
    batch = collate([e, e], tok.pad_token_id)
    assert batch.step_positions.shape == (2, 1)
    assert not batch.step_mask.any()
