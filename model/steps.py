"""Turn (problem, steps) into token ids with one separator token after every step.

The chat template is rendered once with placeholders and split into its literal pieces; the
problem and each step are tokenized on their own with special tokens split, and the separator
id is appended by us. So a separator string typed inside a problem or a step stays plain text
and can never create a phantom step.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
_PROBLEM = "\x00ACTPRM_PROBLEM\x00"
_SOLUTION = "\x00ACTPRM_SOLUTION\x00"


@dataclass
class EncodedTrajectory:
    input_ids: list[int]
    step_positions: list[int]  # index in input_ids of the separator after each kept step
    n_steps: int  # steps in the trajectory
    truncated: bool  # True when trailing steps were dropped to fit max_length

    @property
    def n_scored(self) -> int:
        return len(self.step_positions)


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T) right-padded
    attention_mask: torch.Tensor  # (B, T)
    step_positions: torch.Tensor  # (B, S) separator positions, 0 where step_mask is False
    step_mask: torch.Tensor  # (B, S) True for a real step

    def to(self, device: torch.device | str) -> "Batch":
        """The one place a batch moves to the model's device (a no-op when it is already there).
        Pinned memory lets the copy overlap with work already queued on the GPU."""
        device = torch.device(device)
        if self.input_ids.device == device:
            return self
        pin = device.type == "cuda"
        move = lambda t: (t.pin_memory() if pin else t).to(device, non_blocking=pin)  # noqa: E731
        return Batch(move(self.input_ids), move(self.attention_mask), move(self.step_positions), move(self.step_mask))


@lru_cache(maxsize=16)
def _template_pieces(tokenizer) -> tuple[str, str, str]:
    messages = [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": _PROBLEM},
        {"role": "assistant", "content": _SOLUTION},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    before, rest = text.split(_PROBLEM)
    middle, after = rest.split(_SOLUTION)
    return before, middle, after


def _plain_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def _template_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_trajectory(
    tokenizer, sep_token_id: int, problem: str, steps: list[str], max_length: int
) -> EncodedTrajectory:
    before, middle, after = _template_pieces(tokenizer)
    ids = _template_ids(tokenizer, before) + _plain_ids(tokenizer, problem) + _template_ids(tokenizer, middle)
    positions: list[int] = []
    for i, step in enumerate(steps):
        # Steps are joined by a newline so the text reads as the model was trained on it.
        piece = _plain_ids(tokenizer, step if i == 0 else "\n" + step)
        if len(ids) + len(piece) + 1 > max_length:
            break  # drop this and every later step whole: never score a cut step
        ids += piece
        ids.append(sep_token_id)
        positions.append(len(ids) - 1)
    if len(positions) == len(steps):
        ids += _template_ids(tokenizer, after)
    # Every kept separator is inside the limit, so the cut only drops closing tokens or, for
    # an over-long prompt, text that no step's score would be read from anyway.
    ids = ids[:max_length]
    return EncodedTrajectory(ids, positions, n_steps=len(steps), truncated=len(positions) < len(steps))


def collate(encoded: list[EncodedTrajectory], pad_token_id: int) -> Batch:
    B = len(encoded)
    T = max(len(e.input_ids) for e in encoded)
    S = max(1, max(e.n_scored for e in encoded))
    input_ids = torch.full((B, T), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    step_positions = torch.zeros((B, S), dtype=torch.long)
    step_mask = torch.zeros((B, S), dtype=torch.bool)
    for b, e in enumerate(encoded):
        input_ids[b, : len(e.input_ids)] = torch.tensor(e.input_ids)
        attention_mask[b, : len(e.input_ids)] = 1
        step_positions[b, : e.n_scored] = torch.tensor(e.step_positions, dtype=torch.long)
        step_mask[b, : e.n_scored] = True
    return Batch(input_ids, attention_mask, step_positions, step_mask)


def plan_batches(lengths: list[int], max_batch: int, max_tokens: int | None = None) -> list[list[int]]:
    """Group trajectories into scoring batches: indices sorted by length, each batch at most
    `max_batch` rows and at most `max_tokens` padded tokens (rows x its longest row).

    Sorting by length keeps padding small; the token budget keeps a batch of long
    trajectories from running out of memory while short ones still fill the device. A row
    longer than the budget on its own gets a batch of one (it must be scored anyway)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        # Sorted ascending, so the newest row is the longest: padded size = rows x lengths[i].
        fits = len(current) < max_batch and (max_tokens is None or (len(current) + 1) * lengths[i] <= max_tokens)
        if current and not fits:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def padding_stats(lengths: list[int], batches: list[list[int]]) -> dict:
    """Real and padded tokens of a batch plan; waste = padding / padded tokens."""
    real = sum(lengths[i] for b in batches for i in b)
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches if b)
    return {"real_tokens": real, "padded_tokens": padded, "batches": len(batches),
            "padding_waste": (padded - real) / padded if padded else 0.0}
