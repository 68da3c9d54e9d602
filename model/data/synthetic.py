"""Built-in labelled streams and toy tasks with known first-error labels.

- `word_problems`: readable multi-step word problems with a worked solution and one error of a
  given kind (carry-over, misread operand, wrong operation, arithmetic slip) at a known step,
  the later steps consistent with it (the zero-setup default stream).
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

import math
import random
from collections.abc import Iterator

from actprm.model.data.records import Record

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
    return list(iter_marker_trajectories(n, seed, error_rate, min_steps, max_steps))


def iter_marker_trajectories(
    n: int, seed: int = 0, error_rate: float = 0.5, min_steps: int = 2, max_steps: int = 6
) -> Iterator[Record]:
    """`marker_trajectories`, one record at a time (the same records)."""
    _check(n, {"error_rate": error_rate}, min_steps, max_steps, least=1)
    rng = random.Random(f"actprm-marker-{seed}")
    wrong = _exact_flags(rng, n, error_rate)

    def records() -> Iterator[Record]:
        for i in range(n):
            n_steps = rng.randint(min_steps, max_steps)
            label = rng.randrange(n_steps) if wrong[i] else -1
            yield Record(id=f"mark-{seed}-{i}", problem=MARKER_PROBLEM,
                         steps=_marker_steps(rng, n_steps, label, EASY_OK, EASY_BAD), label=label,
                         extra={"source": "synthetic-marker"})
    return records()


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


# --- word problems with realistic error kinds (the built-in stream) --------------------------

# Each kind is a failure real LLM solutions show; what a frozen small backbone can see of each
# differs a lot (see the README's learnability table), which is why the mixture is a setting.
KINDS = ("carry_over", "misread", "wrong_operation", "arithmetic")
# Learnable kinds only: on a frozen SmolLM2-135M the arithmetic slip is not (its first error found
# in 9% of records after 540 labels, against 57% for carry_over), and labels spent on what the
# model can never learn are wasted. misread (47%) and wrong_operation (24%) are learnable but
# need more examples than carry_over: the harder part the ensemble stays unsure of for longer.
DEFAULT_KINDS = {"carry_over": 0.6, "misread": 0.2, "wrong_operation": 0.2}
_OPPOSITE = {"add": "sub", "sub": "add"}


def parse_kinds(text: str) -> dict[str, float]:
    """'carry_over=0.5,misread=0.25' (shares, normalised to sum 1) or 'carry_over,misread' (equal)."""
    out: dict[str, float] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, _, share = part.partition("=")
        name = name.strip()
        if name not in KINDS:
            raise ValueError(f"unknown error kind {name!r}; choose from {', '.join(KINDS)}")
        try:
            value = float(share) if share else 1.0
        except ValueError:
            raise ValueError(f"share of {name} must be a number, got {share!r}") from None
        if not value >= 0:
            raise ValueError(f"share of {name} must be >= 0, got {share!r}")
        out[name] = out.get(name, 0.0) + value
    total = sum(out.values())
    if not out or total <= 0:
        raise ValueError(f"no error kind with a positive share in {text!r}; choose from {', '.join(KINDS)}")
    return {k: v / total for k, v in out.items()}


def _exact_kinds(rng: random.Random, n: int, kinds: dict[str, float]) -> list[str]:
    """n kind names with the given shares, largest remainders first, shuffled."""
    names = sorted(kinds)
    raw = {k: n * kinds[k] for k in names}
    counts = {k: math.floor(v) for k, v in raw.items()}
    for k in sorted(names, key=lambda k: raw[k] - counts[k], reverse=True)[: n - sum(counts.values())]:
        counts[k] += 1
    out = [k for k in names for _ in range(counts[k])]
    rng.shuffle(out)
    return out


def word_problems(n: int, seed: int = 0, **options) -> list[Record]:
    """Word problems with one step per operation ("She buys 5 more: 12 + 5 = 17.") and a final
    "The answer is X." step. In round(n * error_rate) records one operation step k goes wrong,
    the kinds in the shares of `kinds` (default DEFAULT_KINDS), and every later step continues
    correctly from the wrong value; label = k. The kinds at step k:
    - carry_over: the step starts from a number other than the previous result;
    - misread: the equation uses another operand than the words ("buys 20 more: 37 + 2");
    - wrong_operation: the equation does the opposite of the words ("picks up 7 more: 40 - 7");
    - arithmetic: the result is off ("27 + 18 = 46").
    extra: {"kind": one of KINDS or "correct", "answer", "stated_answer", "ops"}.
    options: kinds, error_rate, min_steps, max_steps, as `iter_word_problems` takes them.
    """
    return list(iter_word_problems(n, seed, **options))


def iter_word_problems(
    n: int,
    seed: int = 0,
    kinds: dict[str, float] | None = None,
    error_rate: float = 0.5,
    min_steps: int = 3,
    max_steps: int = 8,
) -> Iterator[Record]:
    """`word_problems`, one record at a time (the same records): a stream of a million keeps
    one record in memory, not a million (the exact shares cost a flag and a kind name each)."""
    kinds = DEFAULT_KINDS if kinds is None else kinds
    _check(n, {"error_rate": error_rate}, min_steps, max_steps, least=2)
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        raise ValueError(f"unknown error kind {unknown[0]!r}; choose from {', '.join(KINDS)}")
    rng = random.Random(f"actprm-words-{seed}")
    wrong = _exact_flags(rng, n, error_rate)
    kind_of = iter(_exact_kinds(rng, sum(wrong), kinds))
    return _word_problems(rng, n, seed, wrong, kind_of, min_steps, max_steps)


def _word_problems(rng: random.Random, n: int, seed: int, wrong: list[bool], kind_of: Iterator[str],
                   min_steps: int, max_steps: int) -> Iterator[Record]:
    for i in range(n):
        kind = next(kind_of) if wrong[i] else "correct"
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
            written = _wrong_step(rng, kind, choices, shown) if j == k else None
            if written is None:
                if j == k:
                    kind = "arithmetic"  # the kind asked for is impossible at these numbers (rare): say so
                varied = [c for c in choices if c[0] != last_kind] or choices
                op, a = rng.choice(varied)
                written = (op, a, shown, op, a)
            op, a, x, eq_op, eq_a = written
            last_kind = op
            phrase = _phrase(rng, op, a, pronoun)
            result = _apply(eq_op, x, eq_a)
            if j == k and kind == "arithmetic":
                result += rng.choice([d for d in _SLIPS if result + d >= 1])
            true = _apply(op, true, a)
            steps.append(f"{pronoun.capitalize()} {phrase}: {x} {_SYMBOL[eq_op]} {eq_a} = {result}.")
            phrases.append(phrase)
            ops.append([op, a])
            shown = result
        steps.append(f"The answer is {shown}.")
        story = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + ", then " + phrases[-1]
        problem = (f"{name} has {start} {obj}. {pronoun.capitalize()} {story}. "
                   f"How many {obj} does {pronoun} have now?")
        yield Record(id=f"wp-{seed}-{i}", problem=problem, steps=steps, label=k,
                     extra={"source": "synthetic-word-problems", "kind": kind, "answer": true,
                            "stated_answer": shown, "ops": ops})


def _wrong_step(rng: random.Random, kind: str, choices: list[tuple[str, int]], shown: int):
    """(op in the words, operand in the words, start, op written, operand written) for an error
    step of `kind` from the previous result `shown`; None when the numbers allow no such step."""
    if kind == "carry_over":
        op, a = rng.choice(choices)
        starts = [shown + d for d in _SLIPS if shown + d >= 1 and _fits(op, shown + d, a)]
        return (op, a, rng.choice(starts), op, a) if starts else None
    if kind == "misread":
        options = []
        for op, a in choices:
            if op in ("add", "sub"):
                options += [(op, a, b) for b in _misreads(a) if op == "add" or shown - b >= 1]
        if not options:
            return None
        op, a, b = rng.choice(options)
        return (op, a, shown, op, b)
    if kind == "wrong_operation":
        options = [(op, a) for op, a in choices if op == "sub" or (op == "add" and a < shown)]
        if not options:
            return None
        op, a = rng.choice(options)
        return (op, a, shown, _OPPOSITE[op], a)
    return None  # arithmetic: a normal step whose result is then off


def _misreads(a: int) -> list[int]:
    """Numbers a reader could take for a: a digit dropped or swapped, or a near miss."""
    options = {a + d for d in (-3, -2, -1, 1, 2, 3, 10)}
    if a >= 10:
        options |= {a // 10, a % 10, int(str(a)[::-1])}
    return sorted(o for o in options if o >= 1 and o != a)


def _fits(op: str, x: int, a: int) -> bool:
    """Is `op a` still a whole, positive step from x (for a carried-over wrong start)?"""
    if op == "sub":
        return x - a >= 1
    if op == "div":
        return x % a == 0
    return op != "mul" or x * a <= _MAX_VALUE * 2


def builtin_records(n: int, seed: int = 0, kinds: dict[str, float] | None = None, error_rate: float = 0.5,
                    markers: bool = False) -> list[Record]:
    """The built-in stream of the embedded default: word problems (`word_problems`), or with
    markers=True the toy "step j ok/bad" records a tiny random backbone can learn (tests)."""
    return list(iter_builtin_records(n, seed, kinds, error_rate, markers))


def iter_builtin_records(n: int, seed: int = 0, kinds: dict[str, float] | None = None, error_rate: float = 0.5,
                         markers: bool = False) -> Iterator[Record]:
    """`builtin_records`, one record at a time (the daemon's built-in stream and `produce --synthetic`)."""
    if markers:
        def marked(records: Iterator[Record]) -> Iterator[Record]:
            for r in records:
                r.extra["kind"] = "marker" if r.label >= 0 else "correct"
                yield r
        return marked(iter_marker_trajectories(n, seed=seed, error_rate=error_rate))
    return iter_word_problems(n, seed=seed, kinds=kinds, error_rate=error_rate)
