"""How good is a judge? Its verdicts on gold-labelled records, as ProcessBench scores a labeller."""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter

from actprm.model.judges.base import Judge, JudgeError, JudgeRequest


def _percentile(values: list[float], q: float) -> float | None:
    """The q-quantile (0..1) by linear interpolation between closest ranks; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


async def judge_quality(judge: Judge, records: list, concurrency: int = 1, on_done=None) -> dict:
    """Judge each record (id, problem, steps, label: the gold first error) and score the verdicts.

    f1 and agreement count a failure (an unparseable answer, a timeout) as a wrong label: that
    is what a labeller built on this judge delivers; f1_parsed and agreement_parsed count only
    the answers that gave a verdict. `on_done` is called after each record (a progress bar).
    """
    from actprm.model.eval.metrics import processbench_scores

    slots = asyncio.Semaphore(max(1, concurrency))
    results: list[dict] = []

    async def one(record) -> None:
        async with slots:
            started = time.monotonic()
            try:
                verdict = await judge.judge(JudgeRequest(record.id, record.problem, record.steps, record.label))
            except JudgeError as err:
                results.append({"id": record.id, "gold": record.label, "verdict": None, "reason": err.reason,
                                "latency_s": err.latency_s or time.monotonic() - started, "attempts": err.attempts})
            else:
                results.append({"id": record.id, "gold": record.label, "verdict": verdict.first_error,
                                "latency_s": verdict.latency_s, "attempts": verdict.attempts})
        if on_done is not None:
            on_done()

    await asyncio.gather(*(one(r) for r in records))
    parsed = [r for r in results if r["verdict"] is not None]
    # A failure is a wrong label: -2 matches no gold first error and is not "all correct".
    every = processbench_scores([-2 if r["verdict"] is None else r["verdict"] for r in results],
                                [r["gold"] for r in results])
    among = processbench_scores([r["verdict"] for r in parsed], [r["gold"] for r in parsed])
    latencies = [r["latency_s"] for r in results]
    # Failures by kind: the reason without its particulars (quoted text, figures in brackets).
    reasons = Counter(re.sub(r" [('\"].*", "", r["reason"])[:100] for r in results if r["verdict"] is None)
    rounded = lambda x: None if x is None else round(x, 4)  # noqa: E731
    return {
        "judge": getattr(judge, "name", "?"), "prompt_version": getattr(judge, "prompt_version", None), "n": len(results),
        "n_error": every["n_error"], "n_correct": every["n_correct"],
        "f1": rounded(every["f1"]), "acc_error": rounded(every["acc_error"]), "acc_correct": rounded(every["acc_correct"]),
        "agreement": rounded(sum(r["verdict"] == r["gold"] for r in results) / len(results)) if results else None,
        "parse_rate": rounded(len(parsed) / len(results)) if results else None,
        "f1_parsed": rounded(among["f1"]),
        "agreement_parsed": rounded(sum(r["verdict"] == r["gold"] for r in parsed) / len(parsed)) if parsed else None,
        "latency_p50_s": rounded(_percentile(latencies, 0.5)), "latency_p99_s": rounded(_percentile(latencies, 0.99)),
        "retries": sum(r["attempts"] - 1 for r in results),
        "failures": dict(reasons.most_common(8)),
        "verdicts_predicted_all_correct": sum(r["verdict"] == -1 for r in parsed),
    }
