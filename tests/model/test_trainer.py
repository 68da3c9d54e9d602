"""Incremental updates: a tiny PRM learns a visible task; rejected updates change nothing."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from actprm.model.training.trainer import (FitConfig, LabelledSample, Trainer, TrainerConfig, averaged_state,
                                          load_trainable_state, lr_factor, reading, trainable_state)
from support.model import (
    assert_optimizer_states_equal,
    changed_keys,
    clone_state,
    optimizer_state_snapshot,
    processbench_f1,
    synthetic_samples,
    tiny_prm,
    torch_one_thread,  # noqa: F401  (autouse fixture)
)

SAMPLES = [
    LabelledSample("a", "p1", ["s0 ok", "s1 bad", "s2 ok"], 1),
    LabelledSample("b", "p2", ["s0 ok", "s1 ok"], -1),
    LabelledSample("c", "p3", ["s0 bad"], 0),
    LabelledSample("d", "p4", ["s0 ok", "s1 ok", "s2 bad"], 2),
]


def _head_param_names(prm) -> set[str]:
    return {f"heads.{n}" for n, _ in prm.heads.named_parameters()}


# --- learning ---------------------------------------------------------------------------------

def test_full_mode_learns_a_task_visible_in_the_text():
    # Label = first step written "bad". A working PRM pipeline (separator positions, labels,
    # BCE on the right steps, optimizer) learns it in a couple of epochs on the tiny model.
    torch.manual_seed(0)
    prm = tiny_prm(4)
    train = synthetic_samples(256, seed=1)
    held_out = synthetic_samples(64, seed=101, prefix="h")
    # Untrained: mu ~ 0.51 on every step -> predicts "no error" everywhere, so accuracy on
    # erroneous records is 0 and F1 is ~0.
    f1_before = processbench_f1(prm, held_out)
    assert f1_before < 0.3

    trainer = Trainer(prm, TrainerConfig(mode="full", lr=3e-3, warmup_steps=2))
    epoch_bce = []
    for _ in range(3):
        losses = []
        for start in range(0, len(train), 16):
            r = trainer.update(train[start : start + 16])
            assert r.applied, r.reason
            losses.append(r.bce)
        epoch_bce.append(sum(losses) / len(losses))
    assert trainer.step == 3 * 256 // 16
    # BCE starts near log(2) = 0.69 and must fall clearly.
    assert epoch_bce[-1] < 0.5 * epoch_bce[0], epoch_bce
    f1_after = processbench_f1(prm, held_out)
    assert f1_after > 0.8, (f1_before, f1_after, epoch_bce)


# --- updates that must not happen ---------------------------------------------------------------

@pytest.mark.parametrize(
    "batch",
    [
        [],  # nothing at all
        [LabelledSample("e", "p", [], -1)],  # a trajectory with no steps has no label
    ],
    ids=["empty", "no-steps"],
)
def test_batch_without_labelled_steps_is_not_applied(batch):
    prm = tiny_prm(4)
    trainer = Trainer(prm, TrainerConfig(mode="full", warmup_steps=0))
    before = clone_state(prm)
    r = trainer.update(batch)
    assert not r.applied and r.step == 0 and trainer.step == 0
    assert changed_keys(before, clone_state(prm)) == set()


def test_truncated_to_nothing_is_not_applied():
    # max_length so small that no step fits: nothing scored -> nothing labelled.
    prm = tiny_prm(4, max_length=30)
    trainer = Trainer(prm, TrainerConfig(mode="heads", warmup_steps=0))
    before = clone_state(prm)
    r = trainer.update(SAMPLES)
    assert not r.applied and r.n_labelled_steps == 0
    assert changed_keys(before, clone_state(prm)) == set()


def test_nan_batch_changes_no_weight_and_no_optimizer_state():
    prm = tiny_prm(4)
    trainer = Trainer(prm, TrainerConfig(mode="full", lr=1e-3, warmup_steps=0))
    # One good update first, so the optimizer has moments a bad step could corrupt.
    assert trainer.update(SAMPLES[:2]).applied
    weights = clone_state(prm)
    opt = optimizer_state_snapshot(trainer.optimizer)

    def poison(module, args, output):  # a real forward hook: hidden states become NaN
        output.last_hidden_state = torch.full_like(output.last_hidden_state, float("nan"))
        return output

    handle = prm.body.register_forward_hook(poison)
    try:
        r = trainer.update(SAMPLES)
    finally:
        handle.remove()
    assert not r.applied and "non-finite" in r.reason
    assert trainer.step == 1 and r.step == 1
    assert changed_keys(weights, clone_state(prm)) == set()
    assert_optimizer_states_equal(opt, optimizer_state_snapshot(trainer.optimizer))
    # No NaN gradient left behind either, and the next good update still works.
    assert all(p.grad is None for p in prm.parameters())
    r = trainer.update(SAMPLES)
    assert r.applied and all(torch.isfinite(p).all() for p in prm.parameters())


@pytest.mark.parametrize("mode", ["heads", "full"])
@pytest.mark.parametrize("failure", ["non-finite", "exception"])
def test_a_refused_fit_restores_weights_optimizer_moments_and_step_exactly(mode, failure):
    prm = tiny_prm(4)
    trainer = Trainer(prm, TrainerConfig(mode=mode, warmup_steps=3))
    samples = [dataclasses.replace(s) for s in SAMPLES]  # fit keeps hidden states on them: not on the shared ones
    assert trainer.fit(samples[:2], [], FitConfig(steps=2, mini_batch=2)).applied  # moments a refusal could lose
    weights, opt, step = clone_state(prm), optimizer_state_snapshot(trainer.optimizer), trainer.step
    assert step == 2 and all({"exp_avg", "exp_avg_sq", "step"} <= st.keys() for st in opt["state"].values())
    calls = {"n": 0}
    real = prm.head_logits

    def fail_on_third(*a, **k):  # two steps are taken (moments, step and lr move), the third fails
        calls["n"] += 1
        if calls["n"] == 3 and failure == "exception":
            raise RuntimeError("injected")
        out = real(*a, **k)
        return out * float("nan") if calls["n"] == 3 else out

    prm.head_logits = fail_on_third
    try:
        if failure == "exception":
            with pytest.raises(RuntimeError, match="injected"):
                trainer.fit(samples, [], FitConfig(steps=4, mini_batch=4))
        else:
            r = trainer.fit(samples, [], FitConfig(steps=4, mini_batch=4))
            assert not r.applied and "non-finite" in r.reason and r.step == step
    finally:
        del prm.head_logits
    assert calls["n"] == 3
    assert changed_keys(weights, clone_state(prm)) == set()
    assert_optimizer_states_equal(opt, optimizer_state_snapshot(trainer.optimizer))  # exp_avg, exp_avg_sq, step, lr
    assert trainer.step == step
    assert all(p.grad is None for p in prm.parameters())


# --- input standardisation --------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["heads", "full"])
def test_the_first_fit_fixes_the_input_standardisation_once(mode):
    prm = tiny_prm(4)
    trainer = Trainer(prm, TrainerConfig(mode=mode, warmup_steps=0))
    samples = [dataclasses.replace(s) for s in SAMPLES]
    hidden = trainer._hidden_states(samples[:2])  # what the first update reads: (3, H) and (2, H)
    assert trainer.fit(samples[:2], [], FitConfig(steps=1)).applied
    rows = torch.cat(hidden)  # (5, H)
    assert int(prm.heads.input_rows) == 5
    torch.testing.assert_close(prm.heads.input_shift, rows.mean(0))
    shift, scale = prm.heads.input_shift.clone(), prm.heads.input_scale.clone()
    # Later updates train the heads on the same input: the stats never move again.
    assert trainer.fit(samples[2:], [], FitConfig(steps=2)).applied
    assert torch.equal(prm.heads.input_shift, shift) and torch.equal(prm.heads.input_scale, scale)


def test_a_refused_first_fit_leaves_the_input_raw():
    prm = tiny_prm(4)
    trainer = Trainer(prm, TrainerConfig(mode="heads", warmup_steps=0))
    real = prm.head_logits
    prm.head_logits = lambda *a, **k: real(*a, **k) * float("nan")
    try:
        assert not trainer.fit([dataclasses.replace(s) for s in SAMPLES], [], FitConfig(steps=1)).applied
    finally:
        del prm.head_logits
    assert int(prm.heads.input_rows) == 0 and not prm.heads.input_shift.any() and bool((prm.heads.input_scale == 1).all())


def test_standardise_inputs_off_keeps_the_raw_states():
    prm = tiny_prm(4)
    trainer = Trainer(prm, TrainerConfig(mode="heads", warmup_steps=0, standardise_inputs=False))
    assert trainer.fit([dataclasses.replace(s) for s in SAMPLES], [], FitConfig(steps=1)).applied
    assert int(prm.heads.input_rows) == 0


def test_a_snapshot_can_be_restored_twice():
    prm = tiny_prm(4)
    trainer = Trainer(prm, TrainerConfig(mode="heads", warmup_steps=0))
    assert trainer.update(SAMPLES[:2]).applied
    snap = trainer.snapshot()
    weights, opt = clone_state(prm), optimizer_state_snapshot(trainer.optimizer)
    for _ in range(2):
        assert trainer.update(SAMPLES).applied
        trainer.restore(snap)
        assert changed_keys(weights, clone_state(prm)) == set() and trainer.step == 1
        assert_optimizer_states_equal(opt, optimizer_state_snapshot(trainer.optimizer))


def test_first_error_out_of_range_is_rejected():
    prm = tiny_prm(4)
    trainer = Trainer(prm, TrainerConfig(mode="heads", warmup_steps=0))
    with pytest.raises(ValueError):
        trainer.update([LabelledSample("x", "p", ["s0 ok", "s1 bad"], 5)])


def test_micro_batching_does_not_change_the_update():
    # Gradients accumulate over micro-batches with each head's loss normalised by its
    # labelled steps in the WHOLE batch, so 1 trajectory per forward pass and all 4 in one
    # padded pass must give the same loss, gradient norm and weights.
    results, weights = [], []
    for micro in (1, 8):
        prm = tiny_prm(8)
        cfg = TrainerConfig(mode="heads", lr=1e-2, warmup_steps=0, p_learn=0.5, seed=1, micro_batch_size=micro)
        results.append(Trainer(prm, cfg).update(SAMPLES))
        weights.append(clone_state(prm.heads))
    one, all_ = results
    assert one.applied and all_.applied
    assert one.bce == pytest.approx(all_.bce, abs=1e-6)
    assert one.grad_norm == pytest.approx(all_.grad_norm, rel=1e-5)
    # Weights: Adam's first step is lr * g / (|g| + eps), so elements whose gradient is
    # ~eps amplify summation-order rounding; all must be close on the scale of lr and
    # nearly all equal to 1e-6.
    for k in weights[0]:
        diff = (weights[0][k] - weights[1][k]).abs()
        assert diff.max() <= 0.05 * 1e-2, k
        assert (diff > 1e-6).float().mean() < 1e-3, k


# --- anchor penalty, bootstrap, lr schedule -----------------------------------------------------

def test_anchor_penalty_zero_at_init_and_grows_after_an_update():
    prm = tiny_prm(4)
    heads = prm.heads
    assert heads.anchor_penalty() == 0.0
    anchors = {n: b.clone() for n, b in heads.named_buffers()}
    trainer = Trainer(prm, TrainerConfig(mode="heads", lr=1e-2, warmup_steps=0, anchor_lambda=0.5))
    r = trainer.update(SAMPLES)
    assert r.applied
    # The penalty is taken before the step: 0 at init, so the first loss is pure BCE.
    assert r.loss == pytest.approx(r.bce, abs=1e-7)
    penalty = heads.anchor_penalty()
    assert penalty > 0
    # It is mean((theta - theta_init)^2) over every head parameter.
    sq = sum(((p - anchors[f"anchor_{n}"]) ** 2).sum().item() for n, p in heads.named_parameters())
    count = sum(p.numel() for p in heads.parameters())
    assert penalty == pytest.approx(sq / count, rel=1e-5)
    # The anchors themselves never move.
    assert all(torch.equal(b, anchors[n]) for n, b in heads.named_buffers())
    # A second update includes the penalty in the loss.
    r2 = trainer.update(SAMPLES)
    assert r2.loss == pytest.approx(r2.bce + 0.5 * penalty, rel=1e-4)


def test_anchor_gradient_in_closed_form_is_the_penalty_gradient():
    """add_anchor_gradient adds d/dtheta of weight * mean((theta - theta_init)^2) to .grad, as
    autograd computes it, on top of what is there, and returns the penalty."""
    heads = tiny_prm(4).heads
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    params = dict(heads.named_parameters())
    count = sum(p.numel() for p in params.values())
    expected = 0.7 * sum(((p - getattr(heads, f"anchor_{n}")) ** 2).sum() for n, p in params.items()) / count
    want = dict(zip(params, torch.autograd.grad(expected, list(params.values()))))
    for p in params.values():
        p.grad = torch.ones_like(p)  # what the BCE left there
    penalty = heads.add_anchor_gradient(0.7)
    assert penalty == pytest.approx(float(expected) / 0.7, rel=1e-5)
    assert penalty == pytest.approx(heads.anchor_penalty(), rel=1e-6)
    for n, p in params.items():
        torch.testing.assert_close(p.grad, want[n] + 1)


def test_bootstrap_gives_heads_different_samples():
    # One sample, E = 8, p_learn = 0.5: each head sees it with probability 1/2. Heads that
    # did not see it get no gradient (the anchor term is 0 at init) and stay bit-exact;
    # heads that saw it move. With p_learn = 1 every head moves.
    sample = [SAMPLES[0]]
    moved = {}
    for p_learn in (0.5, 1.0):
        prm = tiny_prm(8)
        w1 = prm.heads.w1.detach().clone()
        r = Trainer(prm, TrainerConfig(mode="heads", lr=1e-2, warmup_steps=0, p_learn=p_learn, seed=3)).update(sample)
        assert r.applied
        moved[p_learn] = [not torch.equal(w1[e], prm.heads.w1[e]) for e in range(8)]
    assert all(moved[1.0])
    assert any(moved[0.5]) and not all(moved[0.5]), moved[0.5]


def test_bootstrap_heads_end_up_different_from_full_sharing():
    # Several samples: with p_learn = 0.5 heads train on different subsets, so their
    # weights after the update differ from the p_learn = 1 run (same init, same data).
    finals = {}
    for p_learn in (0.5, 1.0):
        prm = tiny_prm(8)
        trainer = Trainer(prm, TrainerConfig(mode="heads", lr=1e-2, warmup_steps=0, p_learn=p_learn))
        for _ in range(3):
            assert trainer.update(SAMPLES).applied
        finals[p_learn] = prm.heads.w3.detach().clone()
    differs = [not torch.allclose(finals[0.5][e], finals[1.0][e], atol=1e-6) for e in range(8)]
    assert sum(differs) >= 2, differs


def test_lr_factor_hand_worked():
    # warm-up 2: (step + 1) / (2 + 1) for steps 0, 1; then flat 1.0 without decay.
    assert [lr_factor(s, 2, None) for s in (0, 1, 2, 3, 100)] == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0, 1.0])
    # warm-up 2 then decay over 4: 1 - (step - 2) / 4 -> 1, 0.75, 0.5, 0.25, 0, clamped at 0.
    assert [lr_factor(s, 2, 4) for s in (2, 3, 4, 5, 6, 9)] == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0, 0.0])
    # no warm-up: full rate at step 0 (never a zero-lr first step)
    assert lr_factor(0, 0, None) == 1.0
    assert lr_factor(1, 0, 4) == pytest.approx(0.75)


def test_update_uses_the_scheduled_lr():
    prm = tiny_prm(4)
    trainer = Trainer(prm, TrainerConfig(mode="heads", lr=3e-3, warmup_steps=2))
    lrs = [trainer.update(SAMPLES).lr for _ in range(3)]
    assert lrs == pytest.approx([1e-3, 2e-3, 3e-3])  # 3e-3 * (1/3, 2/3, 1)


# --- what each mode trains ----------------------------------------------------------------------

def test_heads_mode_leaves_the_backbone_bit_exact():
    prm = tiny_prm(4)
    trainer = Trainer(prm, TrainerConfig(mode="heads", lr=1e-2, warmup_steps=0))
    assert not any(p.requires_grad for p in prm.body.parameters())
    modes = []
    hook = prm.body.register_forward_hook(lambda m, a, o: modes.append(m.training))
    before = clone_state(prm)
    try:
        assert trainer.update(SAMPLES).applied
    finally:
        hook.remove()
    changed = changed_keys(before, clone_state(prm))
    assert changed == _head_param_names(prm)  # every head parameter, and nothing else
    # The shared frozen body is never switched to train mode (a scorer may be using it).
    assert modes and not any(modes) and not prm.body.training


def test_lora_mode_changes_only_lora_and_heads():
    prm = tiny_prm(4)
    trainer = Trainer(prm, TrainerConfig(mode="lora", lr=1e-2, warmup_steps=0))
    lora_names = {f"body.{n}" for n, _ in prm.body.named_parameters() if "lora_" in n}
    assert lora_names, "LoRA adapters were not injected"
    assert all(p.requires_grad == ("lora_" in n) for n, p in prm.body.named_parameters())
    before = clone_state(prm)
    assert trainer.update(SAMPLES).applied
    changed = changed_keys(before, clone_state(prm))
    assert _head_param_names(prm) <= changed
    assert changed - _head_param_names(prm) <= lora_names, changed - _head_param_names(prm) - lora_names
    # lora_B starts at zero, so the first step moves B (A gets zero gradient through B = 0).
    assert any("lora_B" in n for n in changed)
    assert not prm.body.training and not prm.heads.training  # back to eval after the update


def test_full_mode_changes_the_backbone():
    prm = tiny_prm(4)
    trainer = Trainer(prm, TrainerConfig(mode="full", lr=1e-3, warmup_steps=0))
    before = clone_state(prm)
    assert trainer.update(SAMPLES).applied
    changed = changed_keys(before, clone_state(prm))
    assert any(k.startswith("body.") for k in changed)
    assert not any(k.startswith("heads.anchor_") for k in changed)


def test_averaged_state_hand_worked():
    previous = {"heads.w1": torch.tensor([0.0, 2.0]), "heads.anchor_w1": torch.tensor([9.0])}
    trained = {"heads.w1": torch.tensor([4.0, 4.0]), "heads.anchor_w1": torch.tensor([1.0])}
    out = averaged_state(previous, trained, 0.75, {"heads.w1"})
    assert out["heads.w1"].tolist() == [1.0, 2.5]  # 0.75 * previous + 0.25 * trained
    assert out["heads.anchor_w1"].tolist() == [1.0]  # not trained: as trained
    assert averaged_state(previous, trained, 0.0, {"heads.w1"})["heads.w1"].tolist() == [4.0, 4.0]


@pytest.mark.parametrize("mode", ["heads", "full"])
def test_reading_a_state_scores_with_it_and_puts_the_own_weights_back_without_a_copy(mode):
    prm = tiny_prm(4)
    trainer = Trainer(prm, TrainerConfig(mode=mode, lr=1e-2, warmup_steps=0))
    other_state = trainable_state(prm, mode)  # what "serves": the weights before an update
    assert trainer.update(SAMPLES).applied
    own = clone_state(prm)
    reference = tiny_prm(4)
    Trainer(reference, TrainerConfig(mode=mode))
    load_trainable_state(reference, other_state)
    texts = [(s.problem, s.steps) for s in SAMPLES]
    with reading(prm, other_state) as inside:
        assert [s.mu for s in inside.score(texts)] == [s.mu for s in reference.score(texts)]
        w1 = prm.heads.w1
        assert w1.data_ptr() == other_state["heads.w1"].data_ptr()  # exchanged, not copied
    assert not changed_keys(own, clone_state(prm))  # its own weights, bit for bit
    assert prm.heads.w1 is w1 and w1.data_ptr() != other_state["heads.w1"].data_ptr()
    assert trainer.update(SAMPLES).applied  # and it trains on from them


def test_reading_a_state_that_does_not_fit_changes_nothing():
    prm = tiny_prm(4)
    own = clone_state(prm)
    with pytest.raises(ValueError, match="no tensor of this shape"):
        with reading(prm, {"heads.w1": torch.zeros(1)}):
            pass
    assert not changed_keys(own, clone_state(prm))
