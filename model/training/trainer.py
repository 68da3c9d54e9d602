"""Incremental updates of the ensemble PRM on judged trajectories.

A TrainerConfig, then one short update step: BCE per head on the labelled separator
positions (each head sees each sample with probability p_learn), averaged over heads, plus
the anchored-ensemble penalty. A step whose loss or gradient is not finite changes nothing.

An update of a live service (`Trainer.fit`, configured by a FitConfig) is several such steps,
each on a mini-batch of the new labels mixed with a replay sample of earlier ones. The
published loop takes one step per batch in a single pass over a finite stream; a service that
must keep learning from a few labels at a time needs more steps per label, and replay is what
keeps those steps from forgetting what earlier labels taught (an online learner trained on
the newest labels alone drifts to them).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from actprm.model.labels import label_tensors
from actprm.model.prm import EnsemblePRM, pad_features, raw_input_scaling

Mode = Literal["heads", "lora", "full"]


class TrainerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    mode: Mode = Field("heads", description="what trains: heads on a frozen backbone (CPU default), +LoRA, or everything (GPU)")
    lr: float = Field(1e-3, gt=0, description="peak learning rate; heads alone take a higher rate than the published full fine-tune (1e-5)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay; the anchor penalty already regularises the heads")
    micro_batch_size: int = Field(8, ge=1, description="trajectories per forward pass; gradients accumulate over the update batch")
    p_learn: float = Field(1.0, gt=0, le=1, description="chance each head sees each sample (bootstrap; published 1.0)")
    anchor_lambda: float = Field(0.5, ge=0, description="weight of mean((theta - theta_init)^2) over head parameters (published 0.5)")
    grad_clip: float = Field(1.0, gt=0, description="max global gradient norm")
    warmup_steps: int = Field(10, ge=0, description="linear warm-up from 0 to lr over this many updates")
    decay_steps: int | None = Field(None, ge=1, description="linear decay to 0 after warm-up; None keeps lr flat, since a stream has no end")
    lora_r: int = Field(8, ge=1, description="LoRA rank (mode=lora)")
    lora_alpha: int = Field(16, ge=1, description="LoRA scaling numerator (mode=lora)")
    lora_targets: tuple[str, ...] = Field(("q_proj", "k_proj", "v_proj", "o_proj"), description="modules that get LoRA adapters")
    seed: int = Field(0, description="seeds the bootstrap masks")
    standardise_inputs: bool = Field(True, description="fix the heads' per-dimension input standardisation from the first update's hidden states (EnsembleHeads); False keeps the raw states")
    gradient_checkpointing: bool = Field(False, description="lora/full: recompute the backbone's activations in the backward pass (less GPU memory, ~30% more time)")


class FitConfig(BaseModel):
    """How much one incremental update trains, and what it replays."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    steps: int = Field(32, ge=1, description="optimizer steps per update (heads steps on cached hidden states take milliseconds)")
    mini_batch: int = Field(32, ge=1, description="trajectories per optimizer step: new labels plus the replayed share")
    replay_share: float = Field(0.5, ge=0, le=1, description="share of each mini-batch drawn from earlier labels (0: new labels only)")
    replay_size: int = Field(4096, ge=0, description="earlier labels kept for replay, oldest out (0: no replay)")


@dataclass
class LabelledSample:
    id: str
    problem: str
    steps: list[str]
    first_error: int  # from the judge; -1 = all correct
    # (S_kept, H) backbone hidden states at the steps, when known (heads mode): a step on them
    # costs no backbone pass. None: the update encodes the text.
    features: torch.Tensor | None = field(default=None, repr=False)


@dataclass
class UpdateResult:
    applied: bool  # False: no weight changed
    reason: str  # why not applied, or "ok"
    loss: float = float("nan")
    bce: float = float("nan")
    grad_norm: float = float("nan")
    lr: float = 0.0
    n_samples: int = 0
    n_labelled_steps: int = 0
    step: int = 0  # optimizer steps taken so far
    steps: int = 0  # optimizer steps this update took (fit: several)
    n_replayed: int = 0  # distinct earlier labels replayed in this update


@dataclass
class TrainerSnapshot:
    """What an update changes, copied: the trainable weights, the optimizer's state_dict (each
    parameter's moments and step, each group's lr) and the trainer's step (Trainer.snapshot)."""

    weights: dict[str, torch.Tensor] = field(repr=False)
    optimizer: dict = field(repr=False)
    step: int


def _copied(tree, device: str | None):
    """A copy of a state_dict-like tree with every tensor cloned (to `device`, or where it is)."""
    if torch.is_tensor(tree):
        return tree.detach().to(device or tree.device, copy=True)
    if isinstance(tree, dict):
        return {k: _copied(v, device) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_copied(v, device) for v in tree)
    return tree


def plan_minibatches(n_new: int, n_replay: int, config: FitConfig, gen: torch.Generator) -> list[tuple[list[int], list[int]]]:
    """(new indices, replay indices) for each optimizer step of one update.

    New labels are dealt in reshuffled rounds, so every one is in a step before any repeats;
    the replayed part is a fresh draw without replacement each step. With no earlier labels
    (a cold start) the whole mini-batch is new labels."""
    if n_new == 0:
        return []
    want_replay = min(n_replay, round(config.mini_batch * config.replay_share)) if config.replay_size else 0
    want_new = max(1, min(n_new, config.mini_batch - want_replay))
    plan, deck = [], []
    for _ in range(config.steps):
        new = []
        while len(new) < want_new:
            if not deck:
                deck = torch.randperm(n_new, generator=gen).tolist()
            pick = deck.pop()
            if pick not in new:
                new.append(pick)
            elif n_new <= len(new):
                break
        replay = torch.randperm(n_replay, generator=gen)[:want_replay].tolist() if want_replay else []
        plan.append((sorted(new), sorted(replay)))
    return plan


def lr_factor(step: int, warmup_steps: int, decay_steps: int | None) -> float:
    """Linear warm-up to 1, then flat or a linear decay to 0 over decay_steps."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if decay_steps is None:
        return 1.0
    return max(0.0, 1.0 - (step - warmup_steps) / decay_steps)


def configure_trainable(prm: EnsemblePRM, config: TrainerConfig) -> None:
    """Freeze or adapt the backbone for the mode; the heads always train."""
    if config.mode == "lora" and not any("lora_" in n for n, _ in prm.body.named_parameters()):
        from peft import LoraConfig, inject_adapter_in_model

        lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, target_modules=list(config.lora_targets))
        inject_adapter_in_model(lora, prm.body)
    for name, p in prm.body.named_parameters():
        p.requires_grad = config.mode == "full" or (config.mode == "lora" and "lora_" in name)
    for p in prm.heads.parameters():
        p.requires_grad = True


def trainable_state(prm: EnsemblePRM, mode: Mode) -> dict[str, torch.Tensor]:
    """What a checkpoint stores for the mode: heads (with anchors), plus LoRA or the full body."""
    state = {f"heads.{k}": v for k, v in prm.heads.state_dict().items()}
    if mode == "lora":
        state |= {f"body.{k}": v for k, v in prm.body.state_dict().items() if "lora_" in k}
    elif mode == "full":
        state |= {f"body.{k}": v for k, v in prm.body.state_dict().items()}
    return {k: v.detach().contiguous().clone() for k, v in state.items()}


INPUT_SCALING = tuple(raw_input_scaling(1))  # EnsembleHeads' standardisation buffers


def load_trainable_state(prm: EnsemblePRM, state: dict[str, torch.Tensor]) -> None:
    heads = {k.removeprefix("heads."): v for k, v in state.items() if k.startswith("heads.")}
    body = {k.removeprefix("body."): v for k, v in state.items() if k.startswith("body.")}
    if not any(k in heads for k in INPUT_SCALING):
        # Saved before heads standardised their input: those heads read the raw states.
        heads |= raw_input_scaling(prm.heads.input_shift.shape[0])
    prm.heads.load_state_dict(heads, strict=True)
    if body:
        missing = set(body) - set(prm.body.state_dict())
        if missing:
            raise KeyError(f"checkpoint has body tensors this backbone lacks, e.g. {sorted(missing)[0]}")
        prm.body.load_state_dict(body, strict=False)


@contextmanager
def reading(prm: EnsemblePRM, state: dict[str, torch.Tensor]) -> Iterator[EnsemblePRM]:
    """Inside the block the PRM's tensors hold `state`; after it, their own values again.

    The storage is exchanged, not copied: in full mode a copy of the trained weights, to put
    them back afterwards, would be a second body in memory. `state` holds tensors of
    trainable_state for the PRM's mode; one on another device or dtype (read from disk) is
    moved there, which is a copy of that tensor only."""
    own = dict(prm.named_parameters(remove_duplicate=False)) | dict(prm.named_buffers(remove_duplicate=False))
    for name, value in state.items():
        if name not in own or own[name].shape != value.shape:
            raise ValueError(f"{name}: the state has no tensor of this shape in the PRM")
    exchanged: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        for name, value in state.items():
            t = own[name]
            exchanged.append((t, t.data))
            t.data = value.to(t.device, t.dtype)
        yield prm
    finally:
        for t, data in reversed(exchanged):  # reversed: a tied tensor gets its first value back last
            t.data = data


@torch.no_grad()
def averaged_state(previous: dict[str, torch.Tensor], trained: dict[str, torch.Tensor], keep: float,
                   names: set[str]) -> dict[str, torch.Tensor]:
    """keep * previous + (1 - keep) * trained for the tensors named (those that train), the
    others (anchors, input scaling) as trained: one step of an exponential average of versions."""
    return {k: v.lerp(previous[k].to(v.device, v.dtype), keep) if k in names and k in previous else v
            for k, v in trained.items()}


class Trainer:
    def __init__(self, prm: EnsemblePRM, config: TrainerConfig | None = None):
        self.prm = prm
        self.config = config or TrainerConfig()
        configure_trainable(prm, self.config)
        if self.config.gradient_checkpointing and self.config.mode != "heads":
            prm.body.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        params = [p for p in prm.parameters() if p.requires_grad]
        # On CPU torch's AdamW defaults to a loop over the tensors (foreach is CUDA's default);
        # its fused kernel took a heads step's optimizer update from 5 ms to 1.2 ms.
        fused = all(p.device.type == "cpu" for p in params) or None
        self.optimizer = torch.optim.AdamW(params, lr=self.config.lr, weight_decay=self.config.weight_decay, fused=fused)
        self.step = 0
        self._gen = torch.Generator().manual_seed(self.config.seed)

    def snapshot(self) -> TrainerSnapshot:
        """The state an update starts from, for `restore` when the update is refused. Heads and
        LoRA are copied where they live; a full fine-tune's copy is kept in host memory (a second
        copy of a model and its moments on the GPU is what it cannot afford)."""
        device = "cpu" if self.config.mode == "full" else None
        weights = {n: p.detach().to(device or p.device, copy=True) for n, p in self.prm.named_parameters() if p.requires_grad}
        weights |= {n: b.detach().clone() for n, b in self._input_scaling()}  # the first update sets them
        return TrainerSnapshot(weights, _copied(self.optimizer.state_dict(), device), self.step)

    @torch.no_grad()
    def restore(self, snap: TrainerSnapshot) -> None:
        """Back to `snap` exactly: weights, the optimizer's moments and steps, its lr, the step.
        Copied into the tensors in place (no new device memory, so it also serves after a CUDA
        out-of-memory error); the snapshot stays intact and can be restored again."""
        for n, p in [*self.prm.named_parameters(), *self._input_scaling()]:
            if n in snap.weights:
                p.copy_(snap.weights[n])
        # state_dict numbers the parameters in the order of the groups' lists.
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        for i, p in enumerate(params):
            saved, live = snap.optimizer["state"].get(i), self.optimizer.state.get(p)
            if saved is None:
                self.optimizer.state.pop(p, None)  # it had no moments before the update
            elif live is not None and live.keys() == saved.keys():
                for k, v in saved.items():
                    if torch.is_tensor(v):
                        live[k].copy_(v)
                    else:
                        live[k] = v
            else:  # moments on the device, the step where the optimizer keeps it (a CPU scalar)
                self.optimizer.state[p] = {k: v.to(p.device if v.dim() else v.device, copy=True) if torch.is_tensor(v)
                                           else v for k, v in saved.items()}
        for group, saved in zip(self.optimizer.param_groups, snap.optimizer["param_groups"]):
            group.update({k: v for k, v in saved.items() if k != "params"})
        self.optimizer.zero_grad(set_to_none=True)
        self.step = snap.step
        self._set_training(False)

    def _input_scaling(self) -> list[tuple[str, torch.Tensor]]:
        return [(f"heads.{n}", getattr(self.prm.heads, n)) for n in INPUT_SCALING]

    def trained_names(self) -> set[str]:
        """The names (as in trainable_state) of the tensors the optimizer changes."""
        return {n for n, p in self.prm.named_parameters() if p.requires_grad}

    def load(self, state: dict[str, torch.Tensor]) -> None:
        """Continue from other weights (a stored version: a rollback, another writer). The
        optimizer's moments belong to the weights they were computed on, so they are reset; the
        step (the lr schedule's position) is kept."""
        load_trainable_state(self.prm, state)
        self.optimizer.state.clear()

    def _set_training(self, on: bool) -> None:
        # In heads mode a scorer may share this frozen backbone from another thread, so only
        # the parts that train change mode.
        self.prm.heads.train(on)
        if self.config.mode != "heads":
            self.prm.body.train(on)

    def update(self, samples: Sequence[LabelledSample]) -> UpdateResult:
        cfg, prm = self.config, self.prm
        for s in samples:
            # A label past the last step would silently train every step as correct.
            if not -1 <= s.first_error < len(s.steps):
                raise ValueError(f"label {s.id}: first error {s.first_error} is out of range for {len(s.steps)} steps")
        if cfg.mode == "heads" and samples and all(s.features is not None for s in samples):
            # The frozen backbone's hidden states are known: the heads alone, one micro-batch.
            feats = [s.features for s in samples]

            def logits_of(rows: slice) -> torch.Tensor:
                at_steps = pad_features(feats[rows])  # (b, S, H)
                return prm.head_logits(at_steps, [int(f.shape[0]) for f in feats[rows]])  # (E, b, S)

            return self._step([s.first_error for s in samples], [int(f.shape[0]) for f in feats], logits_of, len(feats))
        encoded = [prm.encode(s.problem, s.steps) for s in samples]

        def logits_of(rows: slice) -> torch.Tensor:
            batch = prm.collate(encoded[rows])
            return prm.step_logits(batch, backbone_grad=cfg.mode != "heads")  # (E, b, S)

        return self._step([s.first_error for s in samples], [e.n_scored for e in encoded], logits_of, cfg.micro_batch_size)

    def fit(self, new: Sequence[LabelledSample], replay: Sequence[LabelledSample], config: FitConfig) -> UpdateResult:
        """One incremental update: config.steps optimizer steps, each on new labels plus a
        replayed share of earlier ones (plan_minibatches). All or nothing: if any step is
        refused (not finite) or raises, the trainer goes back to where the update started
        (restore: weights, optimizer moments and step)."""
        if not new:
            return UpdateResult(False, "no new label", step=self.step)
        if self.config.mode == "heads":
            self.attach_features(list(new))
        undo = self.snapshot()
        results, replayed = [], set()
        try:
            self.standardise_inputs(new)
            for new_idx, replay_idx in plan_minibatches(len(new), len(replay), config, self._gen):
                result = self.update([new[i] for i in new_idx] + [replay[j] for j in replay_idx])
                if not result.applied and result.reason != "no labelled step in the batch":
                    self.restore(undo)
                    return replace(result, n_samples=len(new), steps=0, step=self.step)
                results.append(result)
                replayed.update(replay_idx)
        except BaseException:
            self.restore(undo)
            raise
        applied = [r for r in results if r.applied]
        if not applied:
            return replace(results[-1], n_samples=len(new), steps=0)
        last = applied[-1]
        return UpdateResult(True, "ok", loss=sum(r.loss for r in applied) / len(applied),
                            bce=sum(r.bce for r in applied) / len(applied), grad_norm=max(r.grad_norm for r in applied),
                            lr=last.lr, n_samples=len(new), n_labelled_steps=sum(len(s.steps) for s in new),
                            step=self.step, steps=len(applied), n_replayed=len(replayed))

    def standardise_inputs(self, samples: Sequence[LabelledSample]) -> bool:
        """Before the heads' first update: fix their input standardisation from these samples'
        hidden states (heads mode: the kept ones; else one backbone pass, not kept). Once set
        it stays: every later version, and each consolidation's candidate, keeps it.
        Returns whether it was set now."""
        heads = self.prm.heads
        if not self.config.standardise_inputs or int(heads.input_rows) > 0:
            return False
        if all(s.features is not None for s in samples):
            rows = [s.features for s in samples]
        else:
            rows = self._hidden_states(samples)
        if sum(r.shape[0] for r in rows) < 2:
            return False  # too little to estimate a spread: the next update tries again
        heads.set_input_scaling(torch.cat([r.float().cpu() for r in rows]))  # (N, H)
        return True

    @torch.inference_mode()
    def _hidden_states(self, samples: Sequence[LabelledSample]) -> list[torch.Tensor]:
        """(S_i, H) hidden states at each sample's steps, in batches, no gradient."""
        prm, size, out = self.prm, max(1, self.config.micro_batch_size), []
        for start in range(0, len(samples), size):
            encoded = [prm.encode(s.problem, s.steps) for s in samples[start:start + size]]
            at_steps = prm.hidden_at_steps(prm.collate(encoded)).float().cpu()  # (b, S, H)
            out += [at_steps[b, : e.n_scored].clone() for b, e in enumerate(encoded)]  # (S_i, H)
        return out

    @torch.inference_mode()
    def attach_features(self, samples: list[LabelledSample]) -> None:
        """Fill in the hidden states of samples that lack them: one backbone pass each, in
        batches, no gradient (heads mode: they never change)."""
        missing = [s for s in samples if s.features is None]
        for s, at_steps in zip(missing, self._hidden_states(missing)):
            s.features = at_steps  # (S_i, H)

    def _step(self, first_errors: list[int], n_scored: list[int], logits_of, micro: int) -> UpdateResult:
        """One optimizer step: bootstrap-masked BCE per head on the labelled steps, averaged
        over heads, plus the anchor penalty; clipped, scheduled, skipped when not finite.
        logits_of(rows) gives the (E, b, S) logits of the trajectories in `rows`."""
        cfg, prm = self.config, self.prm
        targets, mask = label_tensors(first_errors, n_scored, S=max([1] + n_scored))  # (N, S), (N, S)
        E, N = prm.config.n_heads, len(first_errors)
        boot = torch.rand((E, N), generator=self._gen) < cfg.p_learn  # (E, N): which head sees which sample
        per_head = (boot.unsqueeze(-1) & mask.unsqueeze(0)).sum(dim=(1, 2)).float()  # (E,) labelled steps per head
        active = per_head > 0
        n_labelled = int(mask.sum())
        if n_labelled == 0 or not active.any():
            return UpdateResult(False, "no labelled step in the batch", n_samples=N, step=self.step)
        # The labels go where the logits are (no-ops on CPU); the backbone runs under bf16
        # autocast on CUDA, the heads stay float32 (EnsemblePRM.head_logits).
        dev = prm.device
        targets, mask, boot, per_head, active = (t.to(dev) for t in (targets, mask, boot, per_head, active))
        autocast = torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")

        self._set_training(True)
        self.optimizer.zero_grad(set_to_none=True)
        try:
            return self._accumulate(targets, mask, boot, per_head, active, n_labelled, logits_of, micro, autocast)
        except torch.cuda.OutOfMemoryError:
            # Free what the failed step holds so serving goes on; the caller restores the weights.
            self.optimizer.zero_grad(set_to_none=True)
            self._set_training(False)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            raise

    def _accumulate(self, targets, mask, boot, per_head, active, n_labelled: int, logits_of, micro: int,
                    autocast) -> UpdateResult:
        cfg, prm = self.config, self.prm
        N = targets.shape[0]
        bce_total = 0.0
        for start in range(0, N, micro):
            rows = slice(start, start + micro)
            with autocast:
                logits = logits_of(rows).float()  # (E, b, S)
            S = logits.shape[2]
            y = targets[rows, :S].expand_as(logits)  # (E, b, S)
            m = (boot[:, rows].unsqueeze(-1) & mask[rows, :S].unsqueeze(0)).float()  # (E, b, S)
            bce = F.binary_cross_entropy_with_logits(logits, y, reduction="none")  # (E, b, S)
            # Sum of this micro-batch's share of each head's mean BCE, averaged over heads.
            head_sum = (bce * m).sum(dim=(1, 2))  # (E,)
            part = (head_sum[active] / per_head[active]).sum() / active.sum()
            part.backward()
            bce_total += float(part.detach())
        loss = bce_total + cfg.anchor_lambda * prm.heads.add_anchor_gradient(cfg.anchor_lambda)

        params = [p for p in prm.parameters() if p.requires_grad]
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            self._set_training(False)
            return UpdateResult(False, "non-finite loss or gradient; update skipped", loss, bce_total, grad_norm,
                                n_samples=N, n_labelled_steps=n_labelled, step=self.step)
        lr = cfg.lr * lr_factor(self.step, cfg.warmup_steps, cfg.decay_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self._set_training(False)
        return UpdateResult(True, "ok", loss, bce_total, grad_norm, lr, N, n_labelled, self.step)
