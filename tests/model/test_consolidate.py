"""Consolidation's pure parts against hand-worked examples (the validation split, early
stopping, the publish rule), then `train_candidate` on a tiny backbone's hidden states."""

from __future__ import annotations

import pytest
import torch

from actprm.model.backbone import load_backbone
from actprm.model.training.consolidate import (ConsolidateConfig, Figures, beats, early_stopping, fixed_epochs_candidate,
                                               id_hash, refit_candidate, stopping, train_candidate, validation_figures,
                                               validation_ids)
from actprm.model.prm import EnsemblePRM, PRMConfig
from actprm.model.training.trainer import LabelledSample, TrainerConfig, averaged_state

# id_hash of these ids (sha256, first 8 bytes / 2**64), worked out once and written down:
# a 0.7914, b 0.2427, c 0.1816, d 0.0964, e 0.2480, f 0.1452, g 0.8009, h 0.6666
LABELS = [("a", -1), ("b", 2), ("c", -1), ("d", 1), ("e", -1), ("f", 0), ("g", 3), ("h", -1)]


def test_id_hash_is_fixed():
    assert round(id_hash("a"), 4) == 0.7914 and round(id_hash("d"), 4) == 0.0964


def test_validation_slice_is_the_ids_hashed_below_the_fraction():
    # below 0.2: c (correct), d and f (erroneous); both groups are there, nothing is added
    assert validation_ids(LABELS, 0.2) == {"c", "d", "f"}


def test_a_group_missing_from_the_slice_gets_its_lowest_hash_member():
    # below 0.1 only d (erroneous): the correct group {a, c, e, h} adds c, its lowest hash (0.18)
    assert validation_ids(LABELS, 0.1) == {"c", "d"}
    # below 0.01 nothing: each group adds its lowest (c 0.18, d 0.096)
    assert validation_ids(LABELS, 0.01) == {"c", "d"}
    # a group of one stays on the training side (it would leave nothing to train on)
    assert validation_ids([("a", -1), ("b", 2), ("g", 3)], 0.01) == {"b"}


def test_a_label_keeps_its_side_as_labels_arrive():
    before = validation_ids(LABELS, 0.2)
    after = validation_ids(LABELS + [(f"new-{i}", i % 3 - 1) for i in range(50)], 0.2)
    assert before <= after and not ({i for i, _ in LABELS} - before) & after


def F(f1, loss=1.0):
    return Figures(f1, loss)


def test_early_stopping_keeps_the_best_and_stops_after_patience_epochs_without_better():
    # epoch 0 (before training) .. 5: the best is epoch 2 (0.6); epoch 4 ties it on F1 with a
    # higher loss, so it is not better; three epochs (3, 4, 5) without better -> stop at patience 3
    history = [F(0.2), F(0.5), F(0.6, 0.40), F(0.55), F(0.6, 0.45), F(0.58)]
    assert early_stopping(history, patience=3, criterion="f1") == (2, True)
    assert early_stopping(history, patience=4, criterion="f1") == (2, False)
    # the same F1 with a lower loss is better: epoch 4 becomes the best, one epoch after it
    history[4] = F(0.6, 0.30)
    assert early_stopping(history, patience=3, criterion="f1") == (4, False)
    # an undefined F1 (a group missing) is worse than any F1; nothing better than epoch 0 -> 0
    assert early_stopping([F(0.1), F(None, 0.1), F(None, 0.05)], patience=2, criterion="f1") == (0, True)
    assert early_stopping([F(0.3)], patience=1) == (0, False)


def test_early_stopping_on_the_loss_ignores_a_flat_f1():
    # The default: the validation loss. The first epochs often keep F1 at 0 (the heads learn
    # that most steps are correct) while the loss falls; on F1 these would stop at once.
    history = [F(0.25, 0.69), F(0.0, 0.50), F(0.0, 0.42), F(0.3, 0.38), F(0.5, 0.39), F(0.6, 0.40), F(0.6, 0.41)]
    assert early_stopping(history[:3], patience=2, criterion="f1") == (0, True)
    assert early_stopping(history[:3], patience=2) == (2, False)
    # loss best at epoch 3 (0.38); epochs 4, 5, 6 are higher -> stop at patience 3 and keep epoch 3
    assert early_stopping(history, patience=3) == (3, True)
    assert early_stopping(history, patience=4) == (3, False)
    with pytest.raises(ValueError):
        early_stopping([], patience=1)


def test_the_slice_chooses_only_among_epochs_past_the_step_floor():
    # loss best at epoch 1 (0.40) and worse after it; 15 steps an epoch
    history = [F(0.2, 0.69), F(0.5, 0.40), F(0.5, 0.45), F(0.5, 0.46), F(0.5, 0.47)]
    steps_at = [0, 15, 30, 45, 60]
    assert stopping(history, patience=3, steps_at=steps_at) == (1, True)  # no floor: early_stopping's answer
    # a 30-step floor: epochs 2-4 may be kept; 2 is their best, two epochs without better since
    assert stopping(history, patience=3, steps_at=steps_at, min_steps=30) == (2, False)
    assert stopping(history, patience=2, steps_at=steps_at, min_steps=30) == (2, True)
    # only the last epoch reached a 60-step floor; patience counts from there
    assert stopping(history, patience=1, steps_at=steps_at, min_steps=60) == (4, False)
    # before the floor: the last epoch, and no stop
    assert stopping(history, patience=1, steps_at=steps_at, min_steps=100) == (4, False)
    with pytest.raises(ValueError):
        stopping(history, patience=1, steps_at=steps_at[:4])


def test_a_slice_too_small_to_trust_neither_stops_nor_chooses_the_epoch():
    # the same history on an untrusted slice: the last epoch is kept, and training stops only
    # at the step floor (never, without one: it runs all its epochs)
    history = [F(0.2, 0.69), F(0.5, 0.40), F(0.5, 0.45), F(0.5, 0.46), F(0.5, 0.47)]
    steps_at = [0, 15, 30, 45, 60]
    assert stopping(history[:4], patience=3, steps_at=steps_at[:4], min_steps=60, trusted=False) == (3, False)
    assert stopping(history, patience=3, steps_at=steps_at, min_steps=60, trusted=False) == (4, True)
    assert stopping(history, patience=3, steps_at=steps_at, trusted=False) == (4, False)
    assert stopping(history[:1], patience=1, steps_at=[0], trusted=False) == (0, False)


def test_a_candidate_is_published_only_when_better_than_the_served_version():
    assert beats(F(0.8, 0.5), F(0.7, 0.2))
    assert beats(F(0.7, 0.4), F(0.7, 0.5))  # same F1, lower loss
    assert not beats(F(0.7, 0.5), F(0.7, 0.5))  # a tie is not better
    assert not beats(F(0.6, 0.1), F(0.7, 0.9))
    assert not beats(F(None, 0.1), F(0.0, 0.9))


# --- train_candidate -------------------------------------------------------------------------


def _samples(n: int, H: int, seed: int, noisy: float = 0.0) -> list[LabelledSample]:
    """Hidden states where step correctness is in feature 0 (+1 correct, -1 the first error);
    a share `noisy` of them carries a wrong label (something to overfit)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        S = 3 + i % 3
        k = -1 if i % 2 == 0 else i % S
        x = torch.randn((S, H), generator=g) * 0.5
        x[:, 0] = 1.0
        if k >= 0:
            x[k, 0] = -1.0
        label = (S - 1 if k == -1 else -1) if i < noisy * n else k
        out.append(LabelledSample(f"s{seed}-{i}", "p", ["x"] * S, label, x))
    return out


@pytest.fixture(scope="module")
def tiny():
    return load_backbone("tiny")


def test_train_candidate_learns_and_leaves_the_served_prm_alone(tiny):
    served = EnsemblePRM(tiny, PRMConfig(n_heads=4, head_width=16, seed=3))
    before = {k: v.clone() for k, v in served.heads.state_dict().items()}
    H = tiny.hidden_size
    train, val = _samples(48, H, 0), _samples(16, H, 1)
    cand = train_candidate(served, TrainerConfig(lr=1e-2), train, val,
                           ConsolidateConfig(epochs=20, patience=4, mini_batch=16, lr=1e-2), seed=1)
    assert cand.figures.f1 >= 0.7 and cand.start_figures.f1 < 0.5, cand.history
    assert cand.best_epoch >= 1 and cand.steps == cand.epochs * 3  # 48 labels in mini-batches of 16
    # the weights kept are the best epoch's: scoring them again gives its figures
    assert validation_figures(cand.prm, val) == cand.figures
    # the served PRM is untouched; the candidate keeps the same anchors (the heads' first draw)
    assert all(torch.equal(before[k], v) for k, v in served.heads.state_dict().items())
    assert all(torch.equal(cand.prm.heads.state_dict()[k], before[k]) for k in before if k.startswith("anchor_"))


def _opposite_slice(tiny):
    """A served PRM, 48 training labels, and a validation slice that says the opposite of them
    at the first error: once training has learnt the labels, each epoch makes it worse there."""
    served = EnsemblePRM(tiny, PRMConfig(n_heads=4, head_width=16, seed=3))
    H = tiny.hidden_size
    val = [LabelledSample(s.id, s.problem, s.steps, -1 if s.first_error >= 0 else 0, s.features) for s in _samples(16, H, 1)]
    return served, _samples(48, H, 0), val


def test_train_candidate_stops_early_and_keeps_the_best_epoch(tiny):
    # The validation slice says the opposite of the training labels at the first error: once
    # training has learnt that, each epoch makes it worse; training stops `patience` epochs
    # after the best one and keeps that epoch's weights.
    served, train, val = _opposite_slice(tiny)
    cand = train_candidate(served, TrainerConfig(lr=1e-2), train, val,
                           ConsolidateConfig(epochs=40, patience=3, mini_batch=16, lr=1e-2, criterion="f1", min_steps=0,
                                             min_val_labels=0), seed=1)  # early stopping alone: no floor, slice trusted
    assert cand.stopped == "early stopping" and cand.epochs == cand.best_epoch + 3 < 40, cand.history
    best = cand.history[cand.best_epoch]
    assert (cand.figures.f1, cand.figures.loss) == (best["val_f1"], best["val_loss"])
    assert validation_figures(cand.prm, val) == cand.figures


def test_train_candidate_takes_min_steps_before_it_stops_early(tiny):
    # The same opposite slice: early stopping would end it 3 epochs after the best; a floor of
    # 30 steps (10 epochs of 3) keeps it training, and the epoch kept is the best of those that
    # reached the floor.
    served, train, val = _opposite_slice(tiny)
    cand = train_candidate(served, TrainerConfig(lr=1e-2), train, val,
                           ConsolidateConfig(epochs=40, patience=3, mini_batch=16, lr=1e-2, criterion="f1", min_steps=30,
                                             min_val_labels=0),
                           seed=1)
    assert cand.stopped == "early stopping" and cand.steps >= 30 and cand.epochs >= 10, cand.history
    assert cand.epochs >= cand.best_epoch + 3 and cand.best_epoch >= 10 and cand.val_trusted
    assert validation_figures(cand.prm, val) == cand.figures == Figures(cand.history[cand.best_epoch]["val_f1"],
                                                                        cand.history[cand.best_epoch]["val_loss"])


def test_train_candidate_on_an_untrusted_slice_trains_min_steps_and_keeps_the_last_epoch(tiny):
    served = EnsemblePRM(tiny, PRMConfig(n_heads=4, head_width=16, seed=3))
    H = tiny.hidden_size
    val = _samples(16, H, 1)
    cand = train_candidate(served, TrainerConfig(lr=1e-2), _samples(48, H, 0), val,
                           ConsolidateConfig(epochs=40, patience=1, mini_batch=16, lr=1e-2, min_steps=12,
                                             min_val_labels=17), seed=1)
    # 16 labels < 17: not trusted; 12 steps are 4 epochs of 3, and the 4th is kept
    assert not cand.val_trusted and cand.stopped == "min steps", cand.history
    assert (cand.steps, cand.epochs, cand.best_epoch) == (12, 4, 4)
    assert validation_figures(cand.prm, val) == cand.figures


def test_train_candidate_stops_at_its_time_bound(tiny):
    served = EnsemblePRM(tiny, PRMConfig(n_heads=2, head_width=8))
    cand = train_candidate(served, TrainerConfig(), _samples(32, tiny.hidden_size, 2), _samples(8, tiny.hidden_size, 3),
                           ConsolidateConfig(epochs=50, max_seconds=1e-6))
    assert cand.stopped == "time limit" and cand.steps == 0 and cand.best_epoch == 0


def test_lora_candidate_is_a_copy_trained_on_text_within_its_time_bound(tiny):
    # lora/full: the candidate is a deep copy (a second backbone in memory) trained on the text,
    # a backbone forward and backward per label per epoch; max_seconds bounds it.
    import copy

    from actprm.model.training.trainer import Trainer, trainable_state

    served = EnsemblePRM(copy.deepcopy(tiny), PRMConfig(n_heads=2, head_width=8))
    Trainer(served, TrainerConfig(mode="lora"))  # the daemon's trainer injects the adapters
    before = {k: v.clone() for k, v in trainable_state(served, "lora").items()}
    text = [LabelledSample(f"t{i}", "what is 2+2?", ["2+2=4", "so 4"] if i % 2 else ["2+2=5", "so 5"], -1 if i % 2 else 0)
            for i in range(12)]
    cand = train_candidate(served, TrainerConfig(mode="lora", lr=1e-2), text[:8], text[8:],
                           ConsolidateConfig(epochs=3, mini_batch=4, patience=5), seed=0)
    assert cand.epochs == 3 and cand.steps == 6
    assert all(torch.equal(before[k], v) for k, v in trainable_state(served, "lora").items())  # served untouched
    assert any(k.startswith("body.") and "lora_" in k for k in cand.state)
    bounded = train_candidate(served, TrainerConfig(mode="lora"), text[:8], text[8:],
                              ConsolidateConfig(epochs=50, mini_batch=1, max_seconds=0.5, patience=50), seed=0)
    assert bounded.stopped == "time limit" and bounded.seconds < 5


def test_a_refit_trains_the_chosen_epochs_on_the_labels_and_the_slice_and_keeps_the_last_or_their_mean(tiny):
    served = EnsemblePRM(tiny, PRMConfig(n_heads=4, head_width=16, seed=3))
    H = tiny.hidden_size
    train, val = _samples(48, H, 0), _samples(16, H, 1)
    config = ConsolidateConfig(epochs=20, patience=4, mini_batch=16, lr=1e-2, min_steps=0, min_val_labels=0, refit=True,
                               refit_average=False)
    cand = train_candidate(served, TrainerConfig(lr=1e-2), train, val, config, seed=1)
    assert cand.best_epoch >= 1, cand.history
    again = refit_candidate(served, TrainerConfig(lr=1e-2), cand.best_epoch, train, val, config, seed=1)
    # every label, the slice's too; as many epochs as the candidate's chosen one, the last kept
    assert set(again.train_ids) == {s.id for s in train + val}
    assert not again.val_trusted and again.stopped == "epochs"
    assert (again.epochs, again.best_epoch, again.steps) == (cand.best_epoch, cand.best_epoch, cand.best_epoch * 4)
    assert again.averaged_epochs == 0
    assert validation_figures(again.prm, val) == again.figures
    # refit_average (the default): the same epochs, and the second half of them averaged
    averaged = refit_candidate(served, TrainerConfig(lr=1e-2), cand.best_epoch, train, val,
                               config.model_copy(update={"refit_average": True}), seed=1)
    E = cand.best_epoch
    assert averaged.epochs == E and averaged.averaged_epochs == E - E // 2
    assert validation_figures(averaged.prm, val) == averaged.figures


def test_a_candidate_of_fixed_epochs_trains_them_all_on_its_labels_alone_and_keeps_the_last_or_their_mean(tiny):
    served = EnsemblePRM(tiny, PRMConfig(n_heads=4, head_width=16, seed=3))
    H = tiny.hidden_size
    train, val = _samples(48, H, 0), _samples(16, H, 1)
    config = ConsolidateConfig(epochs=50, patience=1, mini_batch=16, lr=1e-2, min_steps=0, min_val_labels=0)
    last = fixed_epochs_candidate(served, TrainerConfig(lr=1e-2), 5, train, val, config, average=False, seed=1)
    # neither the config's epochs nor its patience: 5 epochs of 3 steps, on the training labels only
    assert (last.epochs, last.steps, last.stopped, last.averaged_epochs) == (5, 15, "epochs", 0)
    assert set(last.train_ids) == {s.id for s in train} and set(last.val_ids) == {s.id for s in val}
    assert last.best_epoch == 5 and last.figures == validation_figures(last.prm, val)
    mean = fixed_epochs_candidate(served, TrainerConfig(lr=1e-2), 5, train, val, config, average=True, seed=1)
    assert (mean.epochs, mean.averaged_epochs) == (5, 3)  # epochs 3, 4 and 5
    assert mean.figures == validation_figures(mean.prm, val)
    assert any(not torch.equal(mean.state[k], v) for k, v in last.state.items())


def test_a_running_mean_of_states_is_averaged_state_with_the_newest_weighing_one_over_n():
    # How train_candidate averages epochs: trained tensors averaged, the others (here a counter)
    # the newest state's.
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(5)}
    b = {"w": torch.tensor([3.0, 6.0]), "n": torch.tensor(7)}
    c = {"w": torch.tensor([5.0, 1.0]), "n": torch.tensor(9)}
    mean = averaged_state(a, b, 1 / 2, {"w"})
    assert torch.equal(mean["w"], torch.tensor([2.0, 4.0])) and int(mean["n"]) == 7
    mean = averaged_state(mean, c, 2 / 3, {"w"})
    assert torch.allclose(mean["w"], torch.tensor([3.0, 3.0])) and int(mean["n"]) == 9
    assert torch.equal(a["w"], torch.tensor([1.0, 2.0]))  # the states averaged are left as they were


def test_averaging_keeps_the_mean_of_the_epochs_from_average_from(tiny):
    # An untrusted slice trains a fixed number of epochs; with average_from=3 of 4 the weights
    # kept are the mean of the weights that 3 and 4 epochs of the same training end on.
    from actprm.model.training.trainer import trainable_state

    served = EnsemblePRM(tiny, PRMConfig(n_heads=4, head_width=16, seed=3))
    H = tiny.hidden_size
    train, val = _samples(48, H, 0), _samples(16, H, 1)

    def run(epochs: int, average_from: int | None = None):
        cfg = ConsolidateConfig(epochs=epochs, mini_batch=16, lr=1e-2, min_steps=0, min_val_labels=17)  # untrusted
        return train_candidate(served, TrainerConfig(lr=1e-2), train, val, cfg, seed=1, average_from=average_from)

    three, four, mean = run(3), run(4), run(4, average_from=3)
    assert (three.averaged_epochs, mean.averaged_epochs, mean.epochs) == (0, 2, 4)
    s3, s4, got = (trainable_state(c.prm, "heads") for c in (three, four, mean))
    assert any(not torch.equal(s3[k], s4[k]) for k in s3)  # two different epochs: a real mean
    for k in got:
        if got[k].is_floating_point():
            assert torch.allclose(got[k], (s3[k] + s4[k]) / 2, atol=1e-6), k
    assert validation_figures(mean.prm, val) == mean.figures
    # a time limit before average_from: the last epoch run is kept, nothing averaged
    assert run(2, average_from=3).averaged_epochs == 0
