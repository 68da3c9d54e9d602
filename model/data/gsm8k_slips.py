"""Real-language labelled trajectories from GSM8K worked solutions, with a slip at a known step.

A GSM8K record is {"question", "answer"}; the answer is one step per line, each computation
carrying a calculator annotation (`48/2 = <<48/2=24>>24 clips`), and a last line `#### 72`.
We turn it into steps (annotations removed, the visible text keeps the result) and a final
step "The answer is 72.".

An erroneous trajectory changes the result of one annotated step k (off by one or two, or a
wrong carry), then walks the later steps: every annotated step whose expression uses a changed
value gets the new value substituted, is re-evaluated (exact fractions, safe evaluator) and
its visible expression and result rewritten; the final answer follows. Steps before k are
untouched and step k's visible result is wrong, so the first wrong step is k by construction
(label = k, 0-based); the rest only has to read consistently with the slip. A slip that
cannot be carried through cleanly (a value that cannot be located in the text, a number that
is ambiguous because it also appears in the question, a line without annotation that computes
with a changed value, a result that turns negative or into a non-terminating decimal, a final
answer the slip does not reach) is not written; the next
candidate step or slip is tried, and a record with none left is skipped with its reason.

Everything is deterministic from (records, n, seed, error_rate); the error share is exact,
round(n * error_rate).
"""

from __future__ import annotations

import ast
import json
import operator
import random
import re
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

from actprm.model.data.records import DataError, Record, _read_text

# A number as GSM8K writes it: 48, 22,500, 333,200.00, 0.2, .8. Not part of a longer number
# or word ("x2" is left alone); a sentence's final period is not a decimal point.
_NUM = re.compile(r"(?<![\w.,])(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?![\w,]*\d)|(?<![\w.])\.\d+(?!\d)")
_ANNOTATION = re.compile(r"<<([^<>]*)>>")
_FINAL = re.compile(r"^####\s*(-?\S+)\s*$")
_MAX_DECIMALS = 4  # a recomputed result with more decimals than this does not read like GSM8K


class SlipError(ValueError):
    """A slip cannot be made consistent (or a record cannot be parsed); the message is the reason."""


# ---------------------------------------------------------------------------------------------
# Safe arithmetic: numbers, + - * /, parentheses, unary minus. Never eval().

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}


def evaluate(expr: str) -> Fraction:
    """The exact value of an arithmetic expression (fractions, so 0.2*50 is exactly 10).

    Raises ValueError for anything else: names, calls, powers, attributes, division by zero.
    """
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except SyntaxError:
        raise ValueError(f"not an arithmetic expression: {expr!r}") from None

    def walk(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            # repr of a float is its shortest decimal form, so Fraction(repr(0.8)) is exactly 4/5.
            return Fraction(repr(node.value)) if isinstance(node.value, float) else Fraction(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            left, right = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Div) and right == 0:
                raise ValueError(f"division by zero in {expr!r}")
            return _BINARY[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](walk(node.operand))
        raise ValueError(f"not plain arithmetic ({type(node).__name__}) in {expr!r}")

    return walk(tree)


# ---------------------------------------------------------------------------------------------
# Numbers as text.

def parse_number(token: str) -> Fraction:
    return Fraction(token.replace(",", ""))


def _decimals_needed(value: Fraction) -> int | None:
    """Digits after the point to write `value` exactly; None when it never terminates (73/3) or
    needs more digits than GSM8K would write."""
    den, twos, fives = value.denominator, 0, 0
    while den % 2 == 0:
        den, twos = den // 2, twos + 1
    while den % 5 == 0:
        den, fives = den // 5, fives + 1
    decimals = max(twos, fives)
    return decimals if den == 1 and decimals <= _MAX_DECIMALS else None


def format_like(value: Fraction, like: str) -> str | None:
    """`value` written in the style of the token `like`: thousands separators when it had them,
    its number of decimals when that is enough (333,200.00), else as few as are needed; no
    ".0" on integers. None when the value has no short decimal form (73/3)."""
    needed = _decimals_needed(value)
    if needed is None:
        return None
    had = len(like.split(".")[1]) if "." in like else 0
    decimals = had if needed <= had else needed
    sign, value = ("-", -value) if value < 0 else ("", value)
    scaled = value * 10**decimals
    whole, frac = divmod(int(scaled), 10**decimals)
    text = f"{whole:,}" if "," in like else str(whole)
    if decimals:
        text += "." + str(frac).zfill(decimals)
        if like.startswith(".") and whole == 0:
            text = text[1:]  # GSM8K's ".8" style
    return sign + text


def plain(value: Fraction) -> str:
    """The short decimal form used inside re-evaluated expressions."""
    text = format_like(value, "0")
    if text is None:
        raise SlipError("a result has no short decimal form")
    return text


# ---------------------------------------------------------------------------------------------
# Parsing.

@dataclass
class Step:
    text: str  # the visible line, annotation removed
    expr: str | None = None  # the annotation's expression, e.g. "48/2"
    result: Fraction | None = None  # its stated result
    result_span: tuple[int, int] | None = None  # where the visible result stands in `text`


@dataclass
class Solution:
    question: str
    steps: list[Step]
    answer: str  # the final answer as written after ####, e.g. "72" or "1,080"


@dataclass
class Unreadable:
    """A line of the file that is not JSON; kept in place so indices stay line positions."""

    reason: str


def read_gsm8k(path: str | Path) -> list[Any]:
    """The objects of a GSM8K JSONL file, one per non-blank line (a line that is not JSON is an
    `Unreadable`, skipped later with its reason). Raises DataError (one line, naming the file)
    when the file is missing, unreadable, empty or has no JSON line at all."""
    path = Path(path)
    text = _read_text(path)
    if text.lstrip().startswith("["):
        raise DataError(f"{path}: a JSON array; expected GSM8K JSON Lines (one {{question, answer}} object per line)")
    items: list[Any] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            items.append(json.loads(line))
        except json.JSONDecodeError as e:
            items.append(Unreadable(f"not JSON ({e.msg})"))
    if not items:
        raise DataError(f"{path}: empty file, no records")
    if all(isinstance(x, Unreadable) for x in items):
        raise DataError(f"{path}: not JSON Lines (no line parses as JSON; line 1: {items[0].reason})")
    return items


def parse_record(obj: Any) -> Solution:
    """A GSM8K record as steps. Raises SlipError with the reason when it cannot be used."""
    if isinstance(obj, Unreadable):
        raise SlipError(obj.reason)
    if not isinstance(obj, dict):
        raise SlipError(f"not a JSON object (a {type(obj).__name__})")
    question, answer = obj.get("question"), obj.get("answer")
    if not isinstance(question, str) or not question.strip():
        raise SlipError("no 'question' text")
    if not isinstance(answer, str) or not answer.strip():
        raise SlipError("no 'answer' text")
    lines = [line.strip() for line in answer.strip().splitlines() if line.strip()]
    final = _FINAL.match(lines[-1])
    if final is None:
        raise SlipError("no final '#### <answer>' line")
    token = final.group(1)
    try:
        parse_number(token.lstrip("-"))
    except (ValueError, ZeroDivisionError):
        raise SlipError(f"final answer {token!r} is not a number") from None
    steps = [_parse_line(line) for line in lines[:-1]]
    if not steps:
        raise SlipError("no solution steps before the final answer")
    return Solution(question=question.strip(), steps=steps, answer=token)


def _parse_line(line: str) -> Step:
    """A line with at most one usable annotation (GSM8K has no line with two); an unusable one
    is removed from the text and the step treated as plain text."""
    found = list(_ANNOTATION.finditer(line))
    if len(found) != 1 or "=" not in found[0].group(1):
        return Step(text=_ANNOTATION.sub("", line))
    match = found[0]
    text = line[: match.start()] + line[match.end():]
    expr, stated = match.group(1).rsplit("=", 1)
    try:
        result = evaluate(stated)
        evaluate(expr)
    except ValueError:
        return Step(text=text)
    # The visible result is the number right after the annotation; it must say the same value
    # (it does in 98% of GSM8K's annotations; the rest differ only by thousands separators).
    visible = _NUM.match(text, match.start())
    if visible is None or parse_number(visible.group()) != result:
        return Step(text=text)
    return Step(text=text, expr=expr.strip(), result=result, result_span=visible.span())


def correct_steps(solution: Solution) -> list[str]:
    return [s.text for s in solution.steps] + [f"The answer is {solution.answer}."]


# ---------------------------------------------------------------------------------------------
# The slip and its consequences.

def slip_values(result: Fraction) -> list[Fraction]:
    """Realistic wrong results: off by one or two in the last digit, or a wrong carry (tens or
    hundreds), never zero or negative where the true result was positive."""
    decimals = _decimals_needed(result) or 0
    unit = Fraction(1, 10**decimals)
    deltas = [unit, -unit, 2 * unit, -2 * unit]
    if abs(result) >= 10:
        deltas += [Fraction(10), Fraction(-10)]
    if abs(result) >= 100:
        deltas += [Fraction(100), Fraction(-100)]
    out = []
    for d in deltas:
        v = result + d
        if v != result and (result <= 0 or v > 0):
            out.append(v)
    return out


def _numbers(text: str) -> list[re.Match]:
    return list(_NUM.finditer(text))


def _replace_spans(text: str, edits: list[tuple[tuple[int, int], str]]) -> str:
    for (a, b), new in sorted(edits, reverse=True):
        text = text[:a] + new + text[b:]
    return text


def apply_slip(solution: Solution, k: int, wrong: Fraction) -> list[str]:
    """Steps with step k's result replaced by `wrong`, later steps made consistent with it and
    the final answer following it (so the final answer is always wrong). Raises SlipError when
    that cannot be done cleanly."""
    steps = solution.steps
    step = steps[k]
    if step.expr is None or step.result is None or step.result_span is None:
        raise SlipError(f"step {k} has no usable calculator annotation")
    seen = [parse_number(m.group()) for m in _numbers(solution.question)]

    def check_unambiguous(old: Fraction, j: int) -> None:
        # An old value that also stands in the question or earlier text could be a different
        # quantity that happens to be equal; substituting it later would be a guess.
        earlier = seen + [parse_number(m.group()) for s in steps[:j] for m in _numbers(s.text)]
        a, _ = steps[j].result_span or (len(steps[j].text), 0)
        earlier += [parse_number(m.group()) for m in _numbers(steps[j].text[:a])]
        if old in earlier:
            raise SlipError("a changed value also appears earlier as another quantity")

    changed: dict[Fraction, Fraction] = {}
    out = [s.text for s in steps[:k]]
    check_unambiguous(step.result, k)
    new_text = format_like(wrong, step.text[slice(*step.result_span)])
    if new_text is None:
        raise SlipError("the slipped result has no short decimal form")
    out.append(_replace_spans(step.text, [(step.result_span, new_text)]))
    changed[step.result] = wrong

    for j in range(k + 1, len(steps)):
        s = steps[j]
        if s.expr is None or s.result_span is None:
            # No annotation: numbers that were changed are rewritten where they appear, unless the
            # line computes with them in the open ("56+4 = 60"), which we cannot redo reliably.
            edits = []
            for m in _numbers(s.text):
                v = parse_number(m.group())
                if v in changed:
                    edits.append((m.span(), _format_or_fail(changed[v], m.group())))
            if edits and "=" in s.text:
                raise SlipError("a later step computes with a changed value without an annotation")
            out.append(_replace_spans(s.text, edits))
            continue
        used = [m for m in _NUM.finditer(s.expr) if parse_number(m.group()) in changed]
        if not used:
            out.append(s.text)
            continue
        olds = {parse_number(m.group()) for m in used}
        new_expr = _replace_spans(s.expr, [(m.span(), plain(changed[parse_number(m.group())])) for m in used])
        new_result = evaluate(new_expr)
        a, b = s.result_span
        edits, shown = [], set()
        for m in _numbers(s.text[:a]):
            v = parse_number(m.group())
            if v in olds:
                edits.append((m.span(), _format_or_fail(changed[v], m.group())))
                shown.add(v)
        if shown != olds:
            # e.g. "20% of it" for 0.2*x: the text would keep the old value in another form.
            raise SlipError("a changed value is not visible in a later step's expression")
        if s.result is not None and s.result > 0 and new_result <= 0:
            raise SlipError("a later result would turn zero or negative")
        edits.append(((a, b), _format_or_fail(new_result, s.text[a:b])))
        if new_result != s.result:
            check_unambiguous(s.result, j)
            changed[s.result] = new_result
        out.append(_replace_spans(s.text, edits))

    final = parse_number(solution.answer)
    if final not in changed:
        raise SlipError("the slip does not reach the final answer")
    out.append(f"The answer is {_format_or_fail(changed[final], solution.answer)}.")
    return out


def _format_or_fail(value: Fraction, like: str) -> str:
    text = format_like(value, like.lstrip("-"))
    if text is None:
        raise SlipError("a recomputed result has no short decimal form")
    return text


def slip_record(solution: Solution, rng: random.Random) -> tuple[int, list[str]]:
    """(k, steps) for the first (annotated step, wrong value) that can be carried through: the
    steps in a random order, each step's slips in a random order. Steps are drawn uniformly, not
    (step, slip) pairs, which would favour the last step (its larger result has more slips).
    Raises SlipError with the most common reason when none can."""
    annotated = [k for k, s in enumerate(solution.steps) if s.result_span is not None]
    if not annotated:
        raise SlipError("no step with a usable calculator annotation")
    rng.shuffle(annotated)
    reasons: Counter[str] = Counter()
    for k in annotated:
        wrongs = slip_values(solution.steps[k].result)
        rng.shuffle(wrongs)
        for wrong in wrongs:
            try:
                steps = apply_slip(solution, k, wrong)
                return k, steps
            except (SlipError, ValueError) as e:
                reasons[str(e)] += 1
    raise SlipError(reasons.most_common(1)[0][0] if reasons else "no slip value for any annotated step")


# ---------------------------------------------------------------------------------------------
# A data set.

@dataclass
class SlipsResult:
    records: list[Record]
    skipped: Counter  # reason -> count of GSM8K records passed over


def gsm8k_slips(items: list[Any], n: int, seed: int = 0, error_rate: float = 0.5) -> SlipsResult:
    """n labelled trajectories from GSM8K records `items` (parsed JSON objects, in file order).

    Records are visited in a fixed shuffle of (seed); round(n * error_rate) of the n written
    get a slip (label k), the rest are the unmodified solution (label -1). A record that cannot
    be parsed, or cannot take a consistent slip when an erroneous one is due, is skipped and its
    reason counted. Raises ValueError when n or error_rate is out of range, or when the records
    run out before n are written.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0.0 <= error_rate <= 1.0:
        raise ValueError(f"error rate must be in [0, 1], got {error_rate}")
    rng = random.Random(f"gsm8k-slips-{seed}")
    n_err = round(n * error_rate)
    flags = [True] * n_err + [False] * (n - n_err)
    rng.shuffle(flags)
    order = list(range(len(items)))
    rng.shuffle(order)

    records: list[Record] = []
    skipped: Counter = Counter()
    for i in order:
        if len(records) == n:
            break
        erroneous = flags[len(records)]
        try:
            solution = parse_record(items[i])
            if erroneous:
                # Each record's own stream, so a skip elsewhere does not change this record's slip.
                label, steps = slip_record(solution, random.Random(f"gsm8k-slips-{seed}-{i}"))
            else:
                label, steps = -1, correct_steps(solution)
        except SlipError as e:
            skipped[str(e)] += 1
            continue
        kind = "arithmetic_propagated" if erroneous else "correct"
        records.append(Record(id=f"gsm8k-{i}", problem=solution.question, steps=steps, label=label,
                              extra={"source": "gsm8k-slips", "kind": kind, "gsm8k_index": i,
                                     "generator": "gsm8k-slips", "final_answer_correct": not erroneous}))
    if len(records) < n:
        why = "; ".join(f"{c} x {r}" for r, c in skipped.most_common(3))
        raise DataError(f"only {len(records)} of {n} trajectories could be built from {len(items)} GSM8K records"
                        + (f" (skipped: {why})" if why else ""))
    return SlipsResult(records=records, skipped=skipped)
