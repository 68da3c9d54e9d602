"""The critique prompt a judge model is given, and the parser that reads its verdict."""

from __future__ import annotations

import re

from actprm.model.judges.base import JudgeError, JudgeRequest

# Prompt and verdict
#
# The prompt follows ProcessBench's critique format (paragraphs tagged and numbered from 0, the
# earliest wrong paragraph's index in a box, -1 when none) and the ActivePRM labelling prompt's
# way of reviewing (paragraph by paragraph, stop at the first error: later paragraphs may only
# carry it forward). The instruction never shows a filled box such as the "all correct" one:
# a small model that copies the instruction would otherwise hand back a verdict it never gave.

PROMPT_VERSION = "critique-2"  # change it with any change to the template or to the parser's rules

_CRITIQUE_TEMPLATE = """\
The following is a math problem and a solution to it. The solution is split into paragraphs; \
each is wrapped in tags and numbered from 0.

[Problem]

{problem}

[Solution]

{paragraphs}

Review the solution paragraph by paragraph, in order. For each one, check its arithmetic, its \
algebra, its logic and how it uses the problem's conditions and the earlier paragraphs. \
A paragraph is wrong if it makes a mistake of its own; a paragraph that only carries \
forward an earlier mistake is not the earliest error. Stop at the first wrong paragraph: \
what comes after it does not matter.

When you are done, write your verdict alone on the last line: a LaTeX box, \\boxed{{}}, holding \
one integer, the number of the earliest wrong paragraph (from 0 to {last}); if no paragraph \
is wrong, the integer is minus one. Write nothing after the box."""

# Runs of this many words of the instruction found in an answer mark an echo of the prompt.
_ECHO_WORDS = 8


def critique_messages(problem: str, steps: list[str]) -> list[dict[str, str]]:
    """Chat messages asking the judge for the earliest wrong paragraph (ProcessBench style).

    One user message and no system prompt: reasoning judges such as QwQ are tuned that way.
    """
    if not steps:
        raise ValueError("a critique needs at least one step")
    paragraphs = "\n\n".join(
        f"<paragraph_{i}>\n{step.strip()}\n</paragraph_{i}>" for i, step in enumerate(steps)
    )
    text = _CRITIQUE_TEMPLATE.format(problem=problem.strip(), paragraphs=paragraphs, last=len(steps) - 1)
    return [{"role": "user", "content": text}]


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def _shingles(words: list[str], n: int = _ECHO_WORDS) -> set[tuple[str, ...]]:
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


# The instruction's own words (the template without the problem and the paragraphs).
_INSTRUCTION_SHINGLES = _shingles(_words(re.sub(r"\{\w*\}", " ", _CRITIQUE_TEMPLATE)))

_BOX = re.compile(r"\\boxed\s*\{")
_INTEGER = re.compile(r"-?\d+")
# What may follow the verdict's box on its line: closing markup and punctuation only.
_AFTER_BOX = re.compile(r"[\s.!$*_)\]`]*")


def _unparseable(detail: str) -> JudgeError:
    return JudgeError(f"unparseable judge answer: {detail}", retryable=False)


def _answer_part(text: str) -> str:
    """The text after the reasoning: a box inside <think> is a draft, not the verdict."""
    if "</think>" in text:
        return text.rsplit("</think>", 1)[1]
    if "<think>" in text:
        # The reasoning never ended (e.g. cut at max_tokens), so there is no final answer.
        raise _unparseable("reasoning never finished (<think> without </think>)")
    return text


def _box_contents(line: str) -> list[tuple[str, int]]:
    """Each \\boxed{...} of the line: its content and where its closing brace ends."""
    out = []
    for m in _BOX.finditer(line):
        depth, i = 1, m.end()
        while i < len(line) and depth:
            depth += {"{": 1, "}": -1}.get(line[i], 0)
            i += 1
        if depth:
            raise _unparseable("the verdict's \\boxed{ is never closed")
        out.append((line[m.end() : i - 1], i))
    return out


def parse_verdict(text: str, n_steps: int, finish_reason: str | None = None) -> int:
    """The first-error index the judge gives as its answer; raises JudgeError when unsure.

    The verdict counts only where the judge states it as its answer: one \\boxed{k} on the
    last line after any <think> reasoning, with nothing but closing punctuation after it, k a
    single integer in [-1, n_steps - 1]; a box inside <think> is a draft, and boxes elsewhere
    in the answer that say otherwise leave the verdict in doubt. An answer that
    repeats the prompt's instruction, was cut at max_tokens (finish_reason "length") or ends
    mid-sentence after its box is a judge failure, never a guessed label.
    """
    if n_steps < 0:
        raise ValueError(f"n_steps must be >= 0, got {n_steps}")
    if finish_reason == "length":
        raise _unparseable("the answer was cut at max_tokens before it ended")
    answer = _answer_part(text or "").strip()
    if not answer:
        raise _unparseable("no answer text")
    if _shingles(_words(answer)) & _INSTRUCTION_SHINGLES:
        raise _unparseable("the answer repeats the prompt's instruction")
    last = answer.splitlines()[-1]
    boxes = _box_contents(last)
    if not boxes:
        raise _unparseable("no \\boxed{...} verdict on the answer's last line")
    if len(boxes) > 1:
        raise _unparseable(f"{len(boxes)} boxes on the answer's last line")
    # Boxes that disagree (a box per paragraph, a changed mind outside <think>) leave the verdict in doubt.
    others = {c.strip() for line in answer.splitlines()[:-1] for c, _ in _box_contents(line)}
    if others - {boxes[0][0].strip()}:
        raise _unparseable(f"the answer's boxes disagree ({', '.join(sorted(others | {boxes[0][0].strip()}))[:60]})")
    content, end = boxes[0]
    if not _AFTER_BOX.fullmatch(last[end:]):
        raise _unparseable(f"the answer goes on after its box: {last[end:][:60]!r}")
    content = content.strip()
    if not _INTEGER.fullmatch(content):
        raise _unparseable(f"final box holds {content[:60]!r}, not one integer")
    verdict = int(content)
    if not -1 <= verdict <= n_steps - 1:
        raise _unparseable(f"verdict {verdict} is outside [-1, {n_steps - 1}]")
    return verdict


def _require_steps(request: JudgeRequest) -> None:
    if not request.steps:
        raise JudgeError(f"request {request.id!r} has no steps to judge", retryable=False)
