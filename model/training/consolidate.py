"""Consolidation: train a candidate PRM on every label kept, as the published method trains the
PRM it ships on the data its ensemble selected.

The online updates (Trainer.fit) take a few steps per batch of new labels and leave the served
model under-trained; the features hold more than they take out. A consolidation trains a copy
of the PRM for up to `epochs` passes over all labels kept (the replay store; in heads mode on
the kept hidden states, so no backbone pass), stops early on a validation slice of labels it
never trains on, and keeps its best epoch. The caller publishes it only if it beats the served
version on that slice (`beats`).

Pure parts, tested against hand-worked examples: `validation_ids` (the split),
`early_stopping`, and `stopping` (early stopping only after `min_steps`, and not on a slice
of fewer than `min_val_labels` labels). `train_candidate` is the loop; `validation_figures`
scores a PRM on the slice.

The anchor stays: the candidate's heads keep their anchors (the heads' initial weights) and
the anchor penalty, so the ensemble keeps the diversity the uncertainty rule reads. Starting
"fresh" resets the heads to exactly those initial weights; "served" starts from the weights
that serve now.
"""

from __future__ import annotations

import copy
import hashlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from actprm.model.labels import step_labels
from actprm.model.eval.metrics import processbench_scores
from actprm.model.prm import EnsemblePRM, StepScores
from actprm.model.training.trainer import (LabelledSample, Trainer, TrainerConfig, averaged_state, load_trainable_state,
                                            trainable_state)


class ConsolidateConfig(BaseModel):
    """How a consolidation trains its candidate (the daemon's `consolidate` section adds when)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    # min_steps, not epochs, sets how much a consolidation trains: epochs only caps it (a few
    # hundred labels are a few optimizer steps an epoch), and max_seconds bounds the time.
    epochs: int = Field(200, ge=1, description="most passes over the labels kept")
    patience: int = Field(10, ge=1, description="stop after this many epochs without a better validation figure, counted from the first epoch that reached min_steps")
    min_steps: int = Field(600, ge=0, description="optimizer steps a consolidation takes before the validation slice may end it or choose its epoch (only epochs from here on are kept); 0: no floor")
    min_val_labels: int = Field(30, ge=0, description="a validation slice with fewer labels is too noisy to stop on or to choose an epoch: training runs min_steps (all epochs when 0) and keeps its last epoch; 0: always trust the slice")
    criterion: Literal["loss", "f1"] = Field("loss", description="what early stopping watches on the validation slice: the BCE of the ensemble mean (smooth), or F1 at 0.5 then loss (flat for the first epochs, while the heads learn that most steps are correct)")
    start: Literal["fresh", "served"] = Field("served", description="served: the weights serving now (measured: keeps the online F1, fresh heads lost 0.05-0.15 of it); fresh: the heads' initial weights (their anchors)")
    val_fraction: float = Field(0.15, gt=0, lt=1, description="share of the labels kept that only validate (chosen by a hash of the label id, so a label stays on its side)")
    # The slice that stops a candidate, chooses its epoch and gates it is only as good as its
    # likeness to what the PRM will score: the selected labels are the hard cases the ensemble
    # was unsure of, a sample of the stream is the stream.
    val_sample: Literal["stream", "selected"] = Field("stream", description="the validation slice: stream: every trajectory whose id hashes below val_fraction, judged whether selected or not (a sample of what the PRM scores; costs judge calls for val_fraction of the trajectories not selected; simulate: the pool's validation split); selected: the selected labels whose id hashes below val_fraction (no extra judge calls)")
    mini_batch: int = Field(32, ge=1, description="labels per optimizer step")
    lr: float | None = Field(None, gt=0, description="learning rate (None: the trainer's)")
    # The slice's labels are a sample of the stream, ~30% more labels than the selected ones
    # kept for training, and the only ones that are not hard cases. Once a PRM has trained on
    # them they no longer judge it, so a refit ends the consolidations that can be compared.
    refit: bool = Field(False, description="when the candidate beats the weights it started from on the validation slice, train once more from the same start on its labels and the slice's, for as many epochs as its chosen one (or refit_epochs), and publish that PRM (gated, when `gated`, by its candidate's figures)")
    # A refit keeps its last epoch (the slice it trains on cannot choose one), and one epoch's
    # weights move held-out F1 by a few points from the next. Their mean over the second half
    # holds what those epochs agree on.
    refit_average: bool = Field(True, description="the refit keeps the mean of its weights at the end of each epoch of the second half of its epochs (stochastic weight averaging) instead of its last epoch's")
    # Ungated, the candidate before a refit only counts the refit's epochs, and once the refit
    # averages its epochs that count hardly matters: on 27 demo runs' labels, 16, 20 or 24 epochs
    # averaged scored within 0.0013 held-out F1 of the candidate's count (docs/simulate.md).
    refit_epochs: int | None = Field(None, ge=1, description="an ungated refit (gated = false) trains this many epochs and no candidate before it, so the slice neither counts its epochs nor is left unseen; None: a candidate first, and the refit trains as many epochs as its chosen one")
    # A candidate's epoch chosen on the slice is a draw from the epochs' noise, as the refit's last
    # epoch was; the mean of many epochs holds what they agree on. Offline at the demo's second
    # periodic consolidation (7 runs), 20 epochs averaged scored +0.021 held-out F1 over the epoch
    # the slice chose (docs/simulate.md).
    average_epochs: int | None = Field(None, ge=1, description="a candidate trains this many epochs with no early stopping and keeps the mean of its weights over the second half of them; the slice only gates it (None: early stopping on the slice, which chooses the epoch)")
    max_seconds: float = Field(600.0, gt=0, description="wall-clock bound on one consolidation's training; lora/full mode pays a backbone forward and backward per label per epoch")
    # A served version that a consolidation replaced was chosen on this slice, so its figure there
    # is optimistic: the slice then refuses candidates that are better on the stream.
    gated: bool = Field(True, description="publish the candidate only when it beats the served version on the validation slice; False: always (with refit, the refit is trained whatever the candidate's figures)")

    def stream_sample(self) -> float | None:
        """The share of the stream judged as the validation sample, whether selected or not
        (None: the slice comes from the selected labels alone)."""
        return self.val_fraction if self.val_sample == "stream" else None


# --- pure helpers ----------------------------------------------------------------------------


def id_hash(label_id: str) -> float:
    """A label id's fixed place in [0, 1): the same on every run and machine."""
    return int.from_bytes(hashlib.sha256(label_id.encode()).digest()[:8], "big") / 2.0**64


def in_validation(label_id: str, fraction: float) -> bool:
    """Does this label (its trajectory's id) only validate? Its hash is below `fraction`: the
    scorer samples the stream by it, and the trainer keeps such labels out of its updates."""
    return id_hash(label_id) < fraction


def validation_ids(labels: Sequence[tuple[str, int]], fraction: float) -> set[str]:
    """The ids of (id, first_error) labels that only validate.

    A label validates when its id's hash is below `fraction`, so a label never changes side as
    labels come and go, and a candidate never meets as validation a label that an earlier
    candidate trained on. ProcessBench F1 needs both erroneous and correct trajectories: when a
    group of two or more has none on the validation side, its lowest-hash member goes there."""
    val = {i for i, _ in labels if in_validation(i, fraction)}
    for group in ([i for i, k in labels if k == -1], [i for i, k in labels if k != -1]):
        if len(group) >= 2 and not val.intersection(group):
            val.add(min(group, key=id_hash))
    return val


@dataclass(frozen=True)
class Figures:
    """A PRM on the validation slice: ProcessBench F1 (threshold 0.5) and the mean BCE of the
    ensemble mean on the labelled steps."""

    f1: float | None
    loss: float


def better(a: Figures, b: Figures, criterion: str = "f1") -> bool:
    """Is `a` better than `b`? criterion "f1": a higher F1 (None counts as -1), or the same F1
    and a lower loss; "loss": a lower loss."""
    if criterion == "loss":
        return a.loss < b.loss
    fa, fb = -1.0 if a.f1 is None else a.f1, -1.0 if b.f1 is None else b.f1
    return fa > fb or (fa == fb and a.loss < b.loss)


def beats(candidate: Figures, served: Figures) -> bool:
    """Publish the candidate? Only when it is better than the served version on the slice."""
    return better(candidate, served)


def early_stopping(history: Sequence[Figures], patience: int, criterion: str = "loss") -> tuple[int, bool]:
    """(index of the best entry, stop now?) for figures after each epoch (history[0]: before
    training). Stop when the last `patience` entries brought nothing better than the best."""
    if not history:
        raise ValueError("early_stopping needs at least one entry")
    best = 0
    for i in range(1, len(history)):
        if better(history[i], history[best], criterion):
            best = i
    return best, len(history) - 1 - best >= patience


def stopping(history: Sequence[Figures], patience: int, criterion: str = "loss", *,
             steps_at: Sequence[int], min_steps: int = 0, trusted: bool = True) -> tuple[int, bool]:
    """(index of the epoch to keep, stop now?) for a consolidation whose history[i] was
    measured after steps_at[i] optimizer steps (steps_at[0] = 0: before training).

    The slice chooses only among epochs that reached `min_steps`, and patience counts from
    there. Measured on the built-in stream (full data, fresh heads, 3 seeds): the validation
    loss was lowest at epochs 14-17, where test F1 was 0.654; the last of 38 epochs (600 steps)
    gave 0.743 and of 94 epochs 0.750, so the loss of a ~85-label slice says when calibration
    starts to slip, not when the PRM stops getting better at finding the first error. Before
    the floor the last epoch is kept. A slice that is not `trusted` (too few labels) never
    chooses: the last epoch is kept, and training stops at the floor (never, without one)."""
    if len(steps_at) != len(history):
        raise ValueError(f"{len(history)} figures but {len(steps_at)} step counts")
    first = next((i for i, s in enumerate(steps_at) if s >= min_steps), None)  # the first epoch past the floor
    if not trusted:
        return len(history) - 1, min_steps > 0 and first is not None
    if first is None:
        return len(history) - 1, False
    best, stop = early_stopping(history[first:], patience, criterion)
    return first + best, stop


# --- scoring on the slice --------------------------------------------------------------------


def _score(prm: EnsemblePRM, samples: Sequence[LabelledSample]) -> list[StepScores]:
    if samples and all(s.features is not None for s in samples):
        return prm.score_features([s.features for s in samples], n_steps=[len(s.steps) for s in samples])
    return prm.score([(s.problem, s.steps) for s in samples])


def validation_figures(prm: EnsemblePRM, samples: Sequence[LabelledSample]) -> Figures:
    """F1 at threshold 0.5 (the served rule: the first step with mu < 0.5) and mean BCE of mu."""
    scores = _score(prm, samples)
    f1 = processbench_scores([s.first_error for s in scores], [s.first_error for s in samples])["f1"]
    total, n = 0.0, 0
    for sc, s in zip(scores, samples):
        for mu, y in zip(sc.mu, step_labels(s.first_error, max(len(s.steps), s.first_error + 1))):
            if y is not None:
                p = min(max(mu, 1e-6), 1 - 1e-6)
                total -= y * math.log(p) + (1 - y) * math.log(1 - p)
                n += 1
    return Figures(f1, total / n if n else float("inf"))


# --- the loop --------------------------------------------------------------------------------


@dataclass
class Candidate:
    """A trained candidate: its best epoch's weights and how it got there."""

    prm: EnsemblePRM
    trainer: Trainer
    state: dict[str, torch.Tensor] = field(repr=False)  # trainable_state at the best epoch
    figures: Figures  # on the validation slice, at the best epoch
    start_figures: Figures  # before training
    epochs: int  # epochs run
    best_epoch: int  # 0: training made nothing better than the start
    steps: int
    stopped: str  # "early stopping", "min steps" (slice not trusted), "epochs", "time limit", "cancelled", "no label"
    seconds: float
    train_ids: list[str]
    val_ids: list[str]
    history: list[dict]
    val_trusted: bool = True  # False: the slice had under min_val_labels labels; the last epoch is kept
    averaged_epochs: int = 0  # epochs whose end-of-epoch weights were averaged into what is kept (0: none)


def fixed_epochs_candidate(served: EnsemblePRM, trainer_config: TrainerConfig, epochs: int,
                           train: Sequence[LabelledSample], val: Sequence[LabelledSample], config: ConsolidateConfig, *,
                           average: bool, seed: int = 0, served_state: dict[str, torch.Tensor] | None = None,
                           cancelled: Callable[[], bool] = lambda: False) -> Candidate:
    """A consolidation's recipe for `epochs` epochs on `train` with no early stopping, keeping the
    last epoch, or with `average` the mean of the weights at the end of each epoch of the second
    half (from epoch epochs//2 + 1). `val` only scores it."""
    epochs = max(1, epochs)
    cfg = config.model_copy(update={"epochs": epochs, "min_steps": 0, "refit": False,
                                    "min_val_labels": len(val) + 1})  # a slice that never chooses the epoch
    return train_candidate(served, trainer_config, train, val, cfg, seed=seed, served_state=served_state,
                           cancelled=cancelled, average_from=epochs // 2 + 1 if average else None)


def consolidation_candidate(served: EnsemblePRM, trainer_config: TrainerConfig, train: Sequence[LabelledSample],
                            val: Sequence[LabelledSample], config: ConsolidateConfig, *, seed: int = 0,
                            served_state: dict[str, torch.Tensor] | None = None,
                            cancelled: Callable[[], bool] = lambda: False) -> Candidate:
    """A consolidation's candidate as `config` says: `average_epochs` epochs with their second
    half averaged (the slice only scores it), or early stopping on the slice (`train_candidate`)."""
    if config.average_epochs:
        return fixed_epochs_candidate(served, trainer_config, config.average_epochs, train, val, config, average=True,
                                      seed=seed, served_state=served_state, cancelled=cancelled)
    return train_candidate(served, trainer_config, train, val, config, seed=seed, served_state=served_state,
                           cancelled=cancelled)


def refit_candidate(served: EnsemblePRM, trainer_config: TrainerConfig, epochs: int,
                    train: Sequence[LabelledSample], val: Sequence[LabelledSample], config: ConsolidateConfig, *,
                    seed: int = 0, served_state: dict[str, torch.Tensor] | None = None,
                    cancelled: Callable[[], bool] = lambda: False) -> Candidate:
    """A consolidation's recipe on its labels and the slice's for `epochs` epochs (a candidate's
    chosen one, or config.refit_epochs), keeping the last (a slice it trains on cannot choose
    the epoch), or with config.refit_average the mean of its second half's epochs. Its figures
    on the slice are only a check that it learnt them."""
    return fixed_epochs_candidate(served, trainer_config, epochs, list(train) + list(val), val, config,
                                  average=config.refit_average, seed=seed, served_state=served_state,
                                  cancelled=cancelled)


def candidate_prm(served: EnsemblePRM, mode: str) -> EnsemblePRM:
    """A PRM to train beside the served one. heads mode: new heads around the same frozen body
    (which a scorer may be reading: it never changes); lora/full: a deep copy of everything,
    which costs a second copy of the backbone's memory."""
    if mode == "heads":
        return EnsemblePRM(served.backbone, served.config, heads=copy.deepcopy(served.heads))
    return copy.deepcopy(served)


def reset_heads(prm: EnsemblePRM) -> None:
    """Every head back to its initial weights, the anchor it is pulled towards."""
    with torch.no_grad():
        for name, p in prm.heads.named_parameters():
            p.copy_(getattr(prm.heads, f"anchor_{name}"))


def train_candidate(served: EnsemblePRM, trainer_config: TrainerConfig, train: Sequence[LabelledSample],
                    val: Sequence[LabelledSample], config: ConsolidateConfig, *, seed: int = 0,
                    served_state: dict[str, torch.Tensor] | None = None,
                    cancelled: Callable[[], bool] = lambda: False, average_from: int | None = None) -> Candidate:
    """Train a candidate on `train` for up to config.epochs, early stopping on `val`.

    served_state: the served weights to start from (config.start == "served"; default: the
    served PRM's own). The served PRM is never changed: a scorer may be reading it.
    average_from: with an untrusted slice (which keeps the last epoch), keep instead the mean of
    the weights at the end of every epoch from this one on (all those run, when the time limit
    ends training early; the last epoch's when it ends before this one)."""
    t0 = time.monotonic()
    mode = trainer_config.mode
    prm = candidate_prm(served, mode)
    if served_state is not None:
        load_trainable_state(prm, served_state)
    if config.start == "fresh":
        reset_heads(prm)
    cfg = trainer_config.model_copy(update={"seed": seed, **({"lr": config.lr} if config.lr is not None else {})})
    trainer = Trainer(prm, cfg)
    if mode == "heads":
        trainer.attach_features([s for s in list(train) + list(val) if s.features is None])
    trainer.standardise_inputs(train)  # only when no update has set it (a consolidation at version 0)
    start = validation_figures(prm, val)
    trusted = len(val) >= config.min_val_labels
    history, best_state, stopped, steps = [start], trainable_state(prm, mode), "epochs", 0
    steps_at = [0]  # optimizer steps behind each entry of history
    log = [{"epoch": 0, "val_f1": start.f1, "val_loss": start.loss}]
    gen = torch.Generator().manual_seed(seed)
    epoch = 0
    averaging = average_from is not None and not trusted
    mean_state, averaged = None, 0
    if not train:
        stopped = "no label"
    while train and epoch < config.epochs and stopped == "epochs":
        epoch += 1
        order = torch.randperm(len(train), generator=gen).tolist()
        steps_before = steps
        for at in range(0, len(order), config.mini_batch):
            if cancelled():
                stopped = "cancelled"
                break
            if time.monotonic() - t0 > config.max_seconds:
                stopped = "time limit"
                break
            trainer.update([train[i] for i in order[at:at + config.mini_batch]])
            steps += 1
        if steps == steps_before:  # stopped before its first step: no epoch to score (or to keep as the last)
            epoch -= 1
            break
        figures = validation_figures(prm, val)
        history.append(figures)
        steps_at.append(steps)
        log.append({"epoch": epoch, "val_f1": figures.f1, "val_loss": figures.loss})
        best, stop = stopping(history, config.patience, config.criterion, steps_at=steps_at, min_steps=config.min_steps,
                              trusted=trusted)
        if best == len(history) - 1:
            best_state = trainable_state(prm, mode)
        if averaging and epoch >= average_from:  # a running mean: the newest epoch weighs 1 / (averaged + 1)
            state = trainable_state(prm, mode)
            mean_state = state if mean_state is None else averaged_state(mean_state, state, averaged / (averaged + 1),
                                                                         trainer.trained_names())
            averaged += 1
        if stop and stopped == "epochs":
            stopped = "early stopping" if trusted else "min steps"
    best, _ = stopping(history, config.patience, config.criterion, steps_at=steps_at, min_steps=config.min_steps,
                       trusted=trusted)
    if mean_state is not None:
        best_state = mean_state
    load_trainable_state(prm, best_state)
    figures = validation_figures(prm, val) if mean_state is not None else history[best]
    trainer.optimizer.state.clear()  # moments of later epochs do not belong to the best one's weights
    return Candidate(prm, trainer, best_state, figures, start, epoch, best, steps, stopped,
                     round(time.monotonic() - t0, 3), [s.id for s in train], [s.id for s in val], log, trusted,
                     averaged_epochs=averaged)
