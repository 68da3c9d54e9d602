"""Evaluate a PRM on a labelled file: ProcessBench F1 (and PRMBench PRMScore for PRMBench files).

The scoring is split from the counting: `evaluate_records` takes any function that maps
records to per-step scores, so the metric logic is tested with hand-chosen scores, and
`evaluate_file` plugs the real `EnsemblePRM.score` into it.

Truncation: a trajectory longer than the PRM's `max_length` keeps only its leading steps
(later steps are dropped whole, never cut). Only kept steps are scored, so a record whose
gold error lies in the dropped part, and whose kept steps all score >= threshold, predicts
-1 ("no error") and counts as a miss on the erroneous records. That is what the PRM really
said; it is not patched up. How many records were truncated is reported as "truncated" so a
low score from too short a `max_length` is visible.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from tqdm import tqdm

from actprm.model.data.records import Record, load_records, skip_reasons
from actprm.model.eval.metrics import predicted_first_errors, prmbench_by_class, processbench_scores

# Maps records to one list of step scores (p(step correct)) per record. A list shorter than
# the record's steps means the trailing steps were truncated away and are not scored.
ScoreFn = Callable[[Sequence[Record]], Sequence[Sequence[float]]]

# The official PRMBench toolkit adds fully correct samples of class "correct" but leaves them
# out of its overall PRMScore; excluding them here keeps "overall" comparable to published
# numbers (the "correct" class still gets its own row).
PRMBENCH_EXCLUDE_FROM_OVERALL = ("correct",)
# This class has no wrong steps; the official evaluation scores it by the F1 of correct steps.
PRMBENCH_CORRECT_STEPS_ONLY = ("multi_solutions",)
UNCLASSIFIED = "unclassified"


def _is_prmbench(records: Sequence[Record]) -> bool:
    # The PRMBench loader always records where the steps came from and the 0-based error steps;
    # ProcessBench records only carry those keys if the file happened to have such fields.
    return bool(records) and all("error_steps" in r.extra and "source" in r.extra for r in records)


def evaluate_records(
    score_fn: ScoreFn,
    records: Sequence[Record],
    threshold: float = 0.5,
    *,
    prmbench: bool = False,
    chunk_size: int = 32,
    progress: bool = False,
) -> dict:
    """Score `records` with `score_fn` in chunks and compute the ProcessBench metrics.

    The predicted first error of a record is its first scored step with score < threshold,
    -1 when there is none (see the module docstring for truncated records).
    Returns {"f1", "acc_error", "acc_correct", "n", "n_error", "n_correct", "threshold",
    "truncated"}; with prmbench=True also "prmbench": PRMScore per classification plus
    "overall" (from `metrics.prmbench_by_class`, class "correct" left out of "overall").
    F1 and an accuracy are None when a group (erroneous / fully correct records) is empty.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    scores: list[list[float]] = []
    # Chunks bound the memory of one score call and let the bar move; the PRM still batches
    # inside a chunk (and sorts by length there), so a chunk is several PRM batches.
    with tqdm(total=len(records), desc="scoring", unit="rec", file=sys.stderr, disable=not progress) as bar:
        for start in range(0, len(records), chunk_size):
            chunk = records[start : start + chunk_size]
            got = list(score_fn(chunk))
            if len(got) != len(chunk):
                raise ValueError(f"score function returned {len(got)} score lists for {len(chunk)} records")
            for rec, s in zip(chunk, got):
                if len(s) > len(rec.steps):
                    raise ValueError(f"record {rec.id}: {len(s)} scores for {len(rec.steps)} steps")
                scores.append([float(x) for x in s])
            bar.update(len(chunk))

    predicted = predicted_first_errors(scores, threshold)  # raises on NaN scores
    result = processbench_scores(predicted, [r.label for r in records])
    result["threshold"] = threshold
    result["truncated"] = sum(len(s) < len(r.steps) for s, r in zip(scores, records))
    if prmbench:
        result["prmbench"] = prmbench_by_class(
            scores,
            [r.extra.get("error_steps", []) for r in records],
            [r.extra.get("classification") or UNCLASSIFIED for r in records],
            threshold,
            exclude_from_overall=PRMBENCH_EXCLUDE_FROM_OVERALL,
            correct_steps_only=PRMBENCH_CORRECT_STEPS_ONLY,
        )
    return result


def evaluate_file(
    prm,
    path: str | Path,
    threshold: float = 0.5,
    format: str = "auto",
    progress: bool = True,
    limit: int | None = None,
) -> dict:
    """Load a labelled file (`data.load_records`), score it with `prm` (an EnsemblePRM), and
    return the metrics of `evaluate_records` plus "skipped" (records the loader could not use)
    and "skip_reasons" (how many for each reason).

    limit: evaluate only the first `limit` usable records (quick checks, tests).
    PRMBench metrics are added when format is "prmbench", or "auto" and the file is PRMBench.
    Raises data.DataError when the file cannot be read at all.
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    loaded = load_records(path, format=format)
    records = loaded.records if limit is None else loaded.records[:limit]

    def score_fn(chunk: Sequence[Record]) -> list[list[float]]:
        # StepScores.mu holds only the kept steps, which is the truncation contract above.
        return [s.mu for s in prm.score([(r.problem, r.steps) for r in chunk], threshold)]

    is_prmbench = format == "prmbench" or (format == "auto" and _is_prmbench(records))
    # A few PRM batches per chunk: enough to group similar lengths, small enough for the bar.
    chunk = max(1, 4 * getattr(getattr(prm, "config", None), "score_batch_size", 8))
    result = evaluate_records(score_fn, records, threshold, prmbench=is_prmbench, chunk_size=chunk, progress=progress)
    result["skipped"] = len(loaded.skipped)
    result["skip_reasons"] = skip_reasons(loaded.skipped)
    return result


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def format_eval_table(result: dict) -> str:
    """A plain-text table of an `evaluate_file` result for people (the JSON is for machines)."""
    rows = [
        ("acc on erroneous", _fmt(result.get("acc_error")), f"n={result.get('n_error', 0)}"),
        ("acc on correct", _fmt(result.get("acc_correct")), f"n={result.get('n_correct', 0)}"),
        ("F1", _fmt(result.get("f1")), f"n={result.get('n', 0)}"),
    ]
    notes = [f"threshold {result.get('threshold')}"]
    if result.get("skipped"):
        reasons = result.get("skip_reasons") or {}
        why = ": " + ", ".join(f"{n} {reason}" for reason, n in reasons.items()) if reasons else ""
        notes.append(f"{result['skipped']} records skipped by the loader{why}")
    if result.get("truncated"):
        notes.append(f"{result['truncated']} records truncated (dropped steps are not scored)")
    if result.get("f1") is None:
        notes.append("F1 needs records both with and without an error")

    width = max(len(r[0]) for r in rows)
    lines = ["ProcessBench"] + [f"  {name:<{width}}  {value:>6}  {count}" for name, value, count in rows]
    bench = result.get("prmbench")
    if bench:
        names = list(bench)
        w = max(len("class"), *(len(c) for c in names))
        lines.append("PRMBench")
        lines.append(f"  {'class':<{w}}  {'PRMScore':>8}  {'F1 ok':>6}  {'F1 wrong':>8}  steps")
        for cls in names:  # prmbench_by_class puts "overall" last
            m = bench[cls]
            lines.append(
                f"  {cls:<{w}}  {_fmt(m['prmscore']):>8}  {_fmt(m['f1_correct']):>6}  {_fmt(m['f1_wrong']):>8}  {m['n_steps']}"
            )
        if any(c in PRMBENCH_EXCLUDE_FROM_OVERALL for c in names):
            notes.append("PRMBench overall leaves out class 'correct', as the official toolkit does")
    lines.append("(" + "; ".join(notes) + ")")
    return "\n".join(lines)
