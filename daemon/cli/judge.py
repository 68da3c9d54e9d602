"""`actprm judge check`: how good is the configured judge as a labeller?

It judges gold-labelled records (ProcessBench format) with the judge the settings describe
(`judge.*`, as the daemon would) and reports ProcessBench F1 as a labeller, exact first-error
agreement, the parse rate and the latency. The daemon runs the same check at start when
`judge.qualify_n` is set (`qualify`), and refuses to start below `judge.min_f1`.
"""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path
from typing import Annotated, Optional

import structlog
import typer

from actprm.daemon.cli.errors import CLIError

log = structlog.get_logger("actprm")

judge_app = typer.Typer(help="The judge: check it on gold-labelled records.", no_args_is_help=True)


def gold_records(path: Path, n: int | None) -> list:
    """Usable records of a gold-labelled file; with n, a fixed random subset (the same every time)."""
    from actprm.model.data.records import load_records

    if not path.is_file():
        raise CLIError(f"{path} does not exist")
    records = load_records(path).records
    if n is not None and n < len(records):
        order = list(range(len(records)))
        random.Random("actprm-judge-check").shuffle(order)  # a subset that does not follow the file's grouping
        records = [records[i] for i in sorted(order[:n])]
    if not records:
        raise CLIError(f"{path}: no usable records")
    return records


def check(judge_settings, records: list, progress: bool = True) -> dict:
    """Run the judge over the records; the figures of model.judges.judge_quality."""
    from actprm.model.judges.quality import judge_quality
    from actprm.streams.roles.judging import configured_judge

    async def go(advance) -> dict:
        judge = configured_judge(judge_settings)
        try:
            return await judge_quality(judge, records, judge_settings.concurrency, on_done=advance)
        finally:
            await judge.aclose()

    if not progress:
        return asyncio.run(go(None))
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("judging"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("judge", total=len(records))
        return asyncio.run(go(lambda: bar.advance(task)))


def qualify(settings) -> dict | None:
    """The daemon's check at start (judge.qualify_n records of judge.qualify_data): logs the
    figures, and raises CLIError when F1 is below judge.min_f1. None when not asked for."""
    j = settings.judge
    if j.qualify_n == 0:
        return None
    if j.qualify_data is None:
        raise CLIError("judge.qualify_n is set but judge.qualify_data names no gold-labelled file")
    result = check(j, gold_records(j.qualify_data, j.qualify_n), progress=False)
    fields = {k: result[k] for k in ("judge", "n", "f1", "agreement", "parse_rate", "latency_p50_s")}
    if j.min_f1 is not None and (result["f1"] or 0.0) < j.min_f1:
        raise CLIError(f"the judge's ProcessBench F1 {result['f1']} on {result['n']} records of {j.qualify_data} is below "
                       f"judge.min_f1={j.min_f1}; refusing to train on its labels ({json.dumps(fields)})")
    if j.min_f1 is None:
        log.warning("judge checked at start; its labels are trained on whatever the figure (judge.min_f1 unset)",
                    data=str(j.qualify_data), **fields)
    else:
        log.info("judge checked at start", data=str(j.qualify_data), min_f1=j.min_f1, **fields)
    return result


def _table(r: dict) -> str:
    def fmt(x):
        return "-" if x is None else f"{x:.3f}" if isinstance(x, float) else str(x)

    lines = [f"judge {r['judge']}  prompt {r['prompt_version']}  records {r['n']} ({r['n_error']} with an error, "
             f"{r['n_correct']} correct)",
             f"  ProcessBench F1 as a labeller  {fmt(r['f1'])}   (acc_error {fmt(r['acc_error'])}, acc_correct {fmt(r['acc_correct'])})",
             f"  first-error agreement          {fmt(r['agreement'])}",
             f"  parse rate                     {fmt(r['parse_rate'])}   (F1 on parsed {fmt(r['f1_parsed'])}, "
             f"agreement on parsed {fmt(r['agreement_parsed'])})",
             f"  latency p50 / p99              {fmt(r['latency_p50_s'])} s / {fmt(r['latency_p99_s'])} s   retries {r['retries']}"]
    lines += [f"  failure: {n} x {reason}" for reason, n in r["failures"].items()]
    return "\n".join(lines)


@judge_app.command("check")
def check_command(
    data: Annotated[Path, typer.Option("--data", help="gold-labelled records, ProcessBench format (JSON array or JSONL)")],
    n: Annotated[Optional[int], typer.Option("--n", min=1, help="judge a fixed random subset of N records")] = None,
    judge: Annotated[Optional[str], typer.Option("--judge", help="oracle, openai or vllm (default: judge.kind)")] = None,
    base_url: Annotated[Optional[str], typer.Option("--base-url", help="default: judge.base_url")] = None,
    model: Annotated[Optional[str], typer.Option("--model", help="default: judge.model")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object")] = False,
    config: Annotated[Optional[Path], typer.Option("--config", envvar="ACTPRM_CONFIG", help="TOML settings file")] = None,
) -> None:
    """Judge gold-labelled records with the configured judge; report F1, agreement, parse rate, latency."""
    from actprm.daemon.settings import load_settings

    overrides = {k: v for k, v in {"kind": judge, "base_url": base_url, "model": model}.items() if v is not None}
    settings = load_settings(config, **({"judge": overrides} if overrides else {}))
    result = check(settings.judge, gold_records(data, n))
    result["data"] = str(data)
    typer.echo(json.dumps(result, indent=2) if as_json else _table(result))
