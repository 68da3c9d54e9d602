"""The ensemble PRM: one backbone pass, E small MLP heads read at the step separators.

Shapes used below: B trajectories, T tokens, S steps (padded), H backbone hidden size,
E heads, D head width. Every head is an MLP H -> D -> D -> 1 with ReLU; the E heads' weights
are stacked so all of them run as three batched matmuls over the same hidden states. The
hidden states are standardised per dimension first, with a shift and scale fixed once from
the first labelled steps (see EnsembleHeads).

Device and precision: the heads live on the backbone's device and always in float32, so
mu and sigma (means and spreads of 32 probabilities near 0 or 1) keep their digits on a
bf16 backbone; only the (B*S, H) hidden states at the separators are cast up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from actprm.model.backbone import Backbone
from actprm.model.steps import Batch, collate, encode_trajectory, plan_batches
from actprm.model.uncertainty import predicted_first_error


@dataclass
class PRMConfig:
    n_heads: int = 32  # published E
    head_width: int = 128  # published MLP width
    max_length: int = 2048  # published maximum tokens per trajectory
    score_batch_size: int = 8
    # Padded tokens per scoring batch (rows x longest row). 8 x 2048: the defaults never split.
    score_max_tokens: int | None = 16384
    seed: int = 0  # seeds the head initialisation; each head still gets its own draw


class EnsembleHeads(nn.Module):
    """E independent MLPs with stacked weights, plus a frozen copy of their initialisation and
    the standardisation of their input.

    Why standardise: a pretrained LM's hidden states carry a few near-constant dimensions far
    larger than the rest (SmolLM2-135M: one of 576 holds a third of the squared norm), and
    heads on the raw states learn slowly. Measured on the built-in stream (all 576 training
    labels, 25 epochs): test F1 0.655 raw, 0.803 standardised; stats from 16 trajectories did
    as well as from all (0.813). The shift and scale are buffers, not parameters: set once
    (`set_input_scaling`, before the first update), saved with the weights, never trained,
    so the anchors keep meaning the same function. Until set (input_rows == 0) they are the
    identity, which is also what versions saved before them load as.
    """

    def __init__(self, n_heads: int, hidden_size: int, width: int, seed: int = 0):
        super().__init__()
        E, H, D = n_heads, hidden_size, width
        g = torch.Generator().manual_seed(seed)
        self.w1 = nn.Parameter(_uniform((E, H, D), fan_in=H, g=g))
        self.b1 = nn.Parameter(_uniform((E, 1, D), fan_in=H, g=g))
        self.w2 = nn.Parameter(_uniform((E, D, D), fan_in=D, g=g))
        self.b2 = nn.Parameter(_uniform((E, 1, D), fan_in=D, g=g))
        self.w3 = nn.Parameter(_uniform((E, D, 1), fan_in=D, g=g))
        self.b3 = nn.Parameter(_uniform((E, 1, 1), fan_in=D, g=g))
        # The anchored-ensemble regulariser pulls each head towards its own starting point;
        # the anchor is saved with the weights so it survives restarts.
        for name, p in list(self.named_parameters()):
            self.register_buffer(f"anchor_{name}", p.detach().clone())
        for name, value in raw_input_scaling(H).items():
            self.register_buffer(name, value)

    @torch.no_grad()
    def set_input_scaling(self, h: torch.Tensor) -> None:
        """Fix the standardisation from (N, H) hidden states: mean 0 and sd 1 per dimension.
        A dimension (nearly) constant in the sample is scaled as if its sd were 1% of the
        mean sd, so a later state that differs there is not blown up."""
        N, H = h.shape
        if N < 2:
            raise ValueError("input standardisation needs at least 2 hidden states")
        h = h.to(device=self.input_shift.device, dtype=torch.float32)
        sd = h.std(dim=0)  # (H,)
        floor = max(1e-6, 0.01 * float(sd.mean()))
        self.input_shift.copy_(h.mean(dim=0))
        self.input_scale.copy_(1.0 / sd.clamp(min=floor))
        self.input_rows.fill_(N)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        N, H = h.shape
        h = (h - self.input_shift) * self.input_scale  # (N, H) standardised
        # (N, H) @ (E, H, D) broadcasts h to every head; 3 ms a step faster than the einsum.
        x = torch.relu(torch.matmul(h, self.w1) + self.b1)  # (E, N, D)
        x = torch.relu(torch.bmm(x, self.w2) + self.b2)  # (E, N, D)
        return (torch.bmm(x, self.w3) + self.b3).squeeze(-1)  # (E, N)

    @torch.no_grad()
    def anchor_penalty(self) -> float:
        """mean((theta - theta_init)^2) over every head parameter."""
        sq = sum(float((p - getattr(self, f"anchor_{name}")).square().sum()) for name, p in self.named_parameters())
        return sq / sum(p.numel() for p in self.parameters())

    @torch.no_grad()
    def add_anchor_gradient(self, weight: float) -> float:
        """Add the gradient of weight * anchor_penalty() to each parameter's .grad, in closed
        form (2 * weight * (theta - theta_init) / count), and return the penalty. Through
        autograd the penalty cost a third of a heads step (10 of 30 ms)."""
        count = sum(p.numel() for p in self.parameters())
        sq = 0.0
        for name, p in self.named_parameters():
            diff = p - getattr(self, f"anchor_{name}")
            sq += float(torch.dot(diff.view(-1), diff.view(-1)))
            if p.grad is None:
                p.grad = diff.mul_(2 * weight / count)
            else:
                p.grad.add_(diff, alpha=2 * weight / count)
        return sq / count


def raw_input_scaling(H: int) -> dict[str, torch.Tensor]:
    """EnsembleHeads' standardisation buffers before they are set: the identity."""
    return {"input_shift": torch.zeros(H),  # (H,)
            "input_scale": torch.ones(H),  # (H,) 1 / sd
            "input_rows": torch.zeros((), dtype=torch.long)}  # hidden states the stats came from


def _uniform(shape, fan_in: int, g: torch.Generator) -> torch.Tensor:
    # nn.Linear's default init, drawn per head from one generator so heads differ.
    bound = 1.0 / math.sqrt(fan_in)
    return (torch.rand(shape, generator=g) * 2 - 1) * bound


@dataclass
class StepScores:
    """What the ensemble says about one trajectory."""

    mu: list[float]  # (S,) mean over heads of p(step correct)
    sigma: list[float]  # (S,) std over heads
    probs: list[list[float]] = field(repr=False)  # (E, S) per-head probabilities
    first_error: int  # first step with mu < 0.5, -1 when none
    n_steps: int  # steps in the input; len(mu) may be smaller when truncated
    truncated: bool
    n_tokens: int = 0  # tokens the backbone read for this trajectory
    # (S_kept, H) hidden states the heads read, when asked for: on a frozen backbone they are
    # all a later update of the heads needs, so the trainer can skip a second backbone pass.
    features: torch.Tensor | None = field(default=None, repr=False)


class EnsemblePRM(nn.Module):
    def __init__(self, backbone: Backbone, config: PRMConfig | None = None, heads: EnsembleHeads | None = None):
        super().__init__()
        self.config = config or PRMConfig()
        self.backbone = backbone
        self.body = backbone.model  # registered so .parameters() and LoRA see it
        # Given heads let a hot-swap build a new PRM around the same frozen body.
        heads = heads or EnsembleHeads(self.config.n_heads, backbone.hidden_size, self.config.head_width, self.config.seed)
        self.heads = heads.to(device=self.device, dtype=torch.float32)  # float32 on any backbone dtype

    @property
    def device(self) -> torch.device:
        return next(self.body.parameters()).device

    def hidden_at_steps(self, batch: Batch, *, backbone_grad: bool = False) -> torch.Tensor:
        """Backbone hidden states at the separators: (B, S, H); padded steps hold garbage.

        With a frozen backbone this is all the heads ever read, so it can be computed once
        and cached (see features.py)."""
        batch = batch.to(self.device)
        B, S = batch.step_positions.shape
        with torch.set_grad_enabled(backbone_grad and torch.is_grad_enabled()):
            hidden = self.body(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask
            ).last_hidden_state  # (B, T, H)
        H = hidden.shape[-1]
        index = batch.step_positions.unsqueeze(-1).expand(B, S, H)  # (B, S, H)
        return hidden.gather(1, index)  # (B, S, H)

    def head_logits(self, at_steps: torch.Tensor, n_steps: list[int] | None = None) -> torch.Tensor:
        """Logits for every head from hidden states at steps: (B, S, H) -> (E, B, S), in float32
        on the heads' device whatever the dtype and device of the hidden states.

        n_steps: each row's real steps; the heads then read only those (padded steps come back
        0). The built-in stream's 3-8 steps pad a batch by about a third, all of it head compute."""
        B, S, H = at_steps.shape
        w = self.heads.w1
        # Never autocast: a trainer's bf16 autocast is meant for the backbone, the heads stay fp32.
        with torch.autocast(device_type=w.device.type, enabled=False):
            if n_steps is None:
                logits = self.heads(at_steps.reshape(B * S, H).to(device=w.device, dtype=w.dtype))  # (E, B*S)
                return logits.reshape(-1, B, S)  # (E, B, S)
            real = torch.arange(S) < torch.tensor(n_steps).unsqueeze(1)  # (B, S)
            logits = self.heads(at_steps[real.to(at_steps.device)].to(device=w.device, dtype=w.dtype))  # (E, R), R = sum(n_steps)
            out = logits.new_zeros((logits.shape[0], B, S))  # (E, B, S)
            out[:, real.to(w.device)] = logits
            return out

    def step_logits(self, batch: Batch, *, backbone_grad: bool = False) -> torch.Tensor:
        """Logits for every head at every step: (E, B, S); padded steps hold garbage."""
        return self.head_logits(self.hidden_at_steps(batch, backbone_grad=backbone_grad))  # (E, B, S)

    def encode(self, problem: str, steps: list[str]):
        bb = self.backbone
        return encode_trajectory(bb.tokenizer, bb.sep_token_id, problem, steps, self.config.max_length)

    def collate(self, encoded) -> Batch:
        return collate(encoded, self.backbone.tokenizer.pad_token_id)

    @torch.inference_mode()
    def score(self, trajectories: list[tuple[str, list[str]]], threshold: float = 0.5, *,
              keep_features: bool = False, batch_size: int | None = None, max_tokens: int | None = None) -> list[StepScores]:
        """Score (problem, steps) pairs in batches; results keep the input order.

        keep_features: also return each trajectory's hidden states at its steps (float32, CPU).
        batch_size, max_tokens: this call's batch limits (a scorer's live settings); by default
        the config's score_batch_size and score_max_tokens."""
        self.eval()
        encoded = [self.encode(problem, steps) for problem, steps in trajectories]
        # Batching similar lengths together wastes less compute on padding.
        # Sorted by length, cut by count and by a padded-token budget (plan_batches).
        plan = plan_batches([len(e.input_ids) for e in encoded], batch_size or self.config.score_batch_size,
                            max_tokens or self.config.score_max_tokens)
        results: list[StepScores | None] = [None] * len(encoded)
        for idx in plan:
            batch = self.collate([encoded[i] for i in idx])
            at_steps = self.hidden_at_steps(batch)  # (B, S, H)
            kept = [encoded[i] for i in idx]
            probs = torch.sigmoid(self.head_logits(at_steps, [e.n_scored for e in kept])).cpu()  # (E, B, S) float32, one copy off the device
            got = summarise(probs, [e.n_scored for e in kept], [e.n_steps for e in kept],
                            [e.truncated for e in kept], [len(e.input_ids) for e in kept], threshold)
            for b, (i, sc) in enumerate(zip(idx, got)):
                if keep_features:
                    sc.features = at_steps[b, : kept[b].n_scored].float().cpu().clone()  # (S_i, H)
                results[i] = sc
        return results  # type: ignore[return-value]

    @torch.inference_mode()
    def score_features(
        self,
        features: list[torch.Tensor],
        threshold: float = 0.5,
        *,
        n_steps: list[int] | None = None,
        truncated: list[bool] | None = None,
        n_tokens: list[int] | None = None,
        batch_size: int = 256,
    ) -> list[StepScores]:
        """Score precomputed hidden states at the steps (one (S_i, H) tensor per trajectory,
        from hidden_at_steps) with the heads alone: what score() gives on a frozen backbone.

        n_steps / truncated / n_tokens describe the original trajectories (defaults: S_i,
        False, 0); results keep the input order."""
        self.eval()
        N = len(features)
        n_steps = n_steps if n_steps is not None else [f.shape[0] for f in features]
        truncated = truncated if truncated is not None else [False] * N
        n_tokens = n_tokens if n_tokens is not None else [0] * N
        results: list[StepScores] = []
        for start in range(0, N, batch_size):
            rows = range(start, min(N, start + batch_size))
            at_steps = pad_features([features[i] for i in rows])  # (B, S, H)
            probs = torch.sigmoid(self.head_logits(at_steps, [features[i].shape[0] for i in rows])).cpu()  # (E, B, S) float32
            results += summarise(probs, [features[i].shape[0] for i in rows], [n_steps[i] for i in rows],
                                 [truncated[i] for i in rows], [n_tokens[i] for i in rows], threshold)
        return results


def pad_features(features: list[torch.Tensor]) -> torch.Tensor:
    """Stack (S_i, H) tensors into a zero-padded (B, S, H) tensor (the callers know each S_i)."""
    B = len(features)
    S = max([1] + [f.shape[0] for f in features])
    H = features[0].shape[-1] if features else 1
    out = torch.zeros((B, S, H), dtype=features[0].dtype if features else torch.float32)  # (B, S, H)
    for b, f in enumerate(features):
        out[b, : f.shape[0]] = f
    return out


def summarise(
    probs: torch.Tensor,
    n_scored: list[int],
    n_steps: list[int],
    truncated: list[bool],
    n_tokens: list[int],
    threshold: float,
) -> list[StepScores]:
    """Per-head probabilities (E, B, S) -> one StepScores per row, cut to its scored steps.

    sigma is the sample (unbiased, divide by E - 1) std over heads, the convention of the
    official ActPRM trainer (``torch.std``). The population std is smaller by sqrt((E-1)/E)
    and selects fewer trajectories near delta_std.
    """
    mu = probs.mean(dim=0)  # (B, S)
    sigma = probs.std(dim=0, unbiased=True) if probs.shape[0] > 1 else torch.zeros_like(mu)  # (B, S)
    out = []
    for b, n in enumerate(n_scored):
        mu_b = mu[b, :n].tolist()
        out.append(StepScores(
            mu=mu_b,
            sigma=sigma[b, :n].tolist(),
            probs=probs[:, b, :n].tolist(),
            first_error=predicted_first_error(mu_b, threshold),
            n_steps=n_steps[b],
            truncated=truncated[b],
            n_tokens=n_tokens[b],
        ))
    return out
