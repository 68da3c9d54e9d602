"""Built-in labelled streams and toy tasks with known first-error labels.

- `arithmetic_trajectories`: readable multi-step word problems with a worked solution, an
  arithmetic slip injected at a known step (the zero-setup default stream).
- `marker_trajectories`: the label is written in the step text ("step 2 bad"), so a tiny
  random model with a byte-level tokenizer can learn it in seconds (learning tests).
- `hard_minority_pool`: an easy majority and a hard minority with a different, subtler
  marker, so that which trajectories get labelled decides what the model learns
  (active-learning simulation).

Everything is deterministic from (n, seed, parameters). The share of erroneous records (and of
hard records) is exact, round(n * rate), not a coin flip per record, so small samples stay
balanced.
"""

from __future__ import annotations

import random

from actprm.model.data import Record

# name, subject pronoun; "they" is left out because it changes the verb forms.
_NAMES = [
    ("Ava", "she"), ("Liam", "he"), ("Mia", "she"), ("Noah", "he"), ("Zoe", "she"), ("Omar", "he"),
    ("Lena", "she"), ("Ravi", "he"), ("Iris", "she"), ("Kofi", "he"), ("Sara", "she"), ("Tom", "he"),
    ("Yuki", "she"), ("Diego", "he"), ("Nora", "she"), ("Ivan", "he"),
]
_OBJECTS = [
    "apples", "marbles", "stickers", "coins", "books", "pencils", "cookies", "stamps",
    "shells", "cards", "beads", "balloons", "crayons", "buttons", "toy cars", "seeds",
]
_ADD = ["buys {a} more", "finds {a} more", "gets {a} more from a friend", "picks up {a} more", "wins {a} more"]
_SUB = ["gives away {a}", "loses {a}", "sells {a}", "gives {a} to a neighbour", "uses up {a}"]
_MUL = {2: "doubles what {p} has", 3: "triples what {p} has"}
_MUL_N = "ends up with {a} times as many"
_DIV = {2: "keeps half of them"}
_DIV_N = "splits them into {a} equal groups and keeps one group"
_SYMBOL = {"add": "+", "sub": "-", "mul": "*", "div": "/"}
_MAX_VALUE = 600  # keeps the numbers in word-problem range
_SLIPS = (-10, -2, -1, 1, 2, 10)  # typical arithmetic slips: off by one/two, a wrong carry

# Toy-task markers. The hard markers share no letter with "step", "ok", "bad" or digits, so a
# model trained on easy records only has no evidence about them (an ensemble disagrees there),
# and their two forms differ only in order, which takes more examples to learn.
EASY_OK = "ok"
EASY_BAD = "bad"
HARD_OK = "qz"
HARD_BAD = "zq"
MARKER_PROBLEM = "find the first bad step"


def _check(n: int, rates: dict[str, float], min_steps: int, max_steps: int, least: int) -> None:
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    for name, r in rates.items():
        if not 0.0 <= r <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {r}")
    if min_steps < least or max_steps < min_steps:
        raise ValueError(f"need {least} <= min_steps <= max_steps, got min_steps={min_steps}, max_steps={max_steps}")


def _exact_flags(rng: random.Random, n: int, share: float) -> list[bool]:
    k = round(n * share)
    flags = [True] * k + [False] * (n - k)
    rng.shuffle(flags)
    return flags


def _valid_ops(rng: random.Random, values: tuple[int, ...]) -> list[tuple[str, int]]:
    """(kind, operand) choices valid for every value in `values`: the true chain and, after an
    injected slip, the chain the solution follows. Both must stay positive integers so the
    problem has a well-defined answer and the wrong solution still reads naturally."""
    lo, hi = min(values), max(values)
    ops = [("add", rng.randint(2, 20))]
    if lo >= 3:
        ops.append(("sub", rng.randint(1, min(lo - 1, 25))))
    factors = [f for f in (2, 3, 4, 5) if hi * f <= _MAX_VALUE]
    if factors:
        ops.append(("mul", rng.choice(factors)))
    divisors = [d for d in (2, 3, 4, 5) if all(v % d == 0 and v >= 2 * d for v in values)]
    if divisors:
        ops.append(("div", rng.choice(divisors)))
    return ops


def _apply(kind: str, x: int, a: int) -> int:
    if kind == "add":
        return x + a
    if kind == "sub":
        return x - a
    if kind == "mul":
        return x * a
    return x // a  # only chosen when exact


def _phrase(rng: random.Random, kind: str, a: int, pronoun: str) -> str:
    if kind == "add":
        template = rng.choice(_ADD)
    elif kind == "sub":
        template = rng.choice(_SUB)
    elif kind == "mul":
        template = _MUL[a] if a in _MUL and rng.random() < 0.7 else _MUL_N
    else:
        template = _DIV[a] if a in _DIV and rng.random() < 0.7 else _DIV_N
    return template.format(a=a, p=pronoun)


def arithmetic_trajectories(
    n: int, seed: int = 0, error_rate: float = 0.5, min_steps: int = 3, max_steps: int = 8
) -> list[Record]:
    """Word problems with one solution step per operation plus a final "The answer is X." step.

    Steps counts include the final step (so min_steps >= 2). In round(n * error_rate) records
    the result of operation step k is off by a small slip and every later step continues
    correctly from the wrong value; label = k. Otherwise label = -1.
    extra: {"answer": true answer, "stated_answer": the solution's answer, "ops": [[kind, operand], ...]}.
    """
    _check(n, {"error_rate": error_rate}, min_steps, max_steps, least=2)
    rng = random.Random(f"actprm-arith-{seed}")
    wrong = _exact_flags(rng, n, error_rate)
    records = []
    for i in range(n):
        name, pronoun = rng.choice(_NAMES)
        obj = rng.choice(_OBJECTS)
        n_ops = rng.randint(min_steps, max_steps) - 1
        k = rng.randrange(n_ops) if wrong[i] else -1
        true = shown = rng.randint(5, 40)
        start = true
        phrases, steps, ops = [], [], []
        last_kind = ""
        for j in range(n_ops):
            choices = _valid_ops(rng, (true, shown))
            # Prefer a different operation from the previous one, for varied text.
            varied = [c for c in choices if c[0] != last_kind] or choices
            kind, a = rng.choice(varied)
            last_kind = kind
            phrase = _phrase(rng, kind, a, pronoun)
            result = _apply(kind, shown, a)
            true = _apply(kind, true, a)
            if j == k:
                slips = [d for d in _SLIPS if result + d >= 1]
                result += rng.choice(slips)
            steps.append(f"{pronoun.capitalize()} {phrase}: {shown} {_SYMBOL[kind]} {a} = {result}.")
            phrases.append(phrase)
            ops.append([kind, a])
            shown = result
        steps.append(f"The answer is {shown}.")
        if len(phrases) == 1:
            story = phrases[0]
        else:
            story = ", ".join(phrases[:-1]) + ", then " + phrases[-1]
        problem = (
            f"{name} has {start} {obj}. {pronoun.capitalize()} {story}. "
            f"How many {obj} does {pronoun} have now?"
        )
        records.append(
            Record(
                id=f"syn-{seed}-{i}",
                problem=problem,
                steps=steps,
                label=k,
                extra={"source": "synthetic-arithmetic", "answer": true, "stated_answer": shown, "ops": ops},
            )
        )
    return records


def _marker_steps(rng: random.Random, n_steps: int, label: int, ok: str, bad: str) -> list[str]:
    steps = []
    for j in range(n_steps):
        if label == -1 or j < label:
            mark = ok
        elif j == label:
            mark = bad
        else:
            mark = rng.choice((ok, bad))  # after the first error anything goes
        steps.append(f"step {j} {mark}")
    return steps


def marker_trajectories(
    n: int, seed: int = 0, error_rate: float = 0.5, min_steps: int = 2, max_steps: int = 6
) -> list[Record]:
    """Toy records whose steps read "step j ok" or "step j bad" (j 0-based); the first bad step
    is the label, steps after it are random. Strings stay short for a one-byte-per-token
    tokenizer."""
    _check(n, {"error_rate": error_rate}, min_steps, max_steps, least=1)
    rng = random.Random(f"actprm-marker-{seed}")
    wrong = _exact_flags(rng, n, error_rate)
    records = []
    for i in range(n):
        n_steps = rng.randint(min_steps, max_steps)
        label = rng.randrange(n_steps) if wrong[i] else -1
        records.append(
            Record(
                id=f"mark-{seed}-{i}",
                problem=MARKER_PROBLEM,
                steps=_marker_steps(rng, n_steps, label, EASY_OK, EASY_BAD),
                label=label,
                extra={"source": "synthetic-marker"},
            )
        )
    return records


def hard_minority_pool(
    n: int,
    seed: int = 0,
    hard_share: float = 0.2,
    error_rate: float = 0.5,
    min_steps: int = 2,
    max_steps: int = 6,
) -> list[Record]:
    """A pool of round(n * hard_share) hard records among easy ones, in shuffled order.

    easy: "step j ok" / "step j bad" (as `marker_trajectories`).
    hard: "step j qz" (correct) / "step j zq" (wrong): unseen letters and an order-only
    difference. A model that learns from the easy majority alone knows nothing about the
    hard markers, so a selector that finds the hard records beats random selection there.
    Within each kind round(count * error_rate) records have an error. extra={"kind": ...}.
    """
    _check(n, {"hard_share": hard_share, "error_rate": error_rate}, min_steps, max_steps, least=1)
    rng = random.Random(f"actprm-pool-{seed}")
    hard = _exact_flags(rng, n, hard_share)
    n_hard = sum(hard)
    # Errors are drawn per kind so both kinds carry the requested error share.
    wrong_hard = iter(_exact_flags(rng, n_hard, error_rate))
    wrong_easy = iter(_exact_flags(rng, n - n_hard, error_rate))
    records = []
    for i in range(n):
        is_hard = hard[i]
        wrong = next(wrong_hard) if is_hard else next(wrong_easy)
        n_steps = rng.randint(min_steps, max_steps)
        label = rng.randrange(n_steps) if wrong else -1
        ok, bad = (HARD_OK, HARD_BAD) if is_hard else (EASY_OK, EASY_BAD)
        records.append(
            Record(
                id=f"pool-{seed}-{i}",
                problem=MARKER_PROBLEM,
                steps=_marker_steps(rng, n_steps, label, ok, bad),
                label=label,
                extra={"kind": "hard" if is_hard else "easy", "source": "synthetic-pool"},
            )
        )
    return records
