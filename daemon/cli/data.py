"""`actprm data ...`: write labelled trajectory files (ProcessBench JSON) to train or test on.

- `synthetic`: the built-in word problems with realistic error kinds (model/data/synthetic.py).
- `gsm8k-slips`: GSM8K's worked solutions with an arithmetic slip carried through the later
  steps (model/data/gsm8k_slips.py).

Both write atomically and print a one-line summary to stderr. Errors are caught here, not only
in cli.main(), so the command is one line and exit code 1 however it is invoked (CliRunner too).
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Iterator, Optional

import typer

data_app = typer.Typer(help="Write labelled trajectory files (ProcessBench JSON).", no_args_is_help=True)

OutOpt = Annotated[Path, typer.Option("--out", help="ProcessBench JSON file to write (replaced atomically)")]
NOpt = Annotated[int, typer.Option("--n", help="trajectories to write")]
SeedOpt = Annotated[int, typer.Option("--seed", help="the same (n, seed) writes the same file")]
ErrorRateOpt = Annotated[float, typer.Option("--error-rate", help="exact share of trajectories with an error")]


@contextmanager
def _one_line_errors() -> Iterator[None]:
    try:
        yield
    except (ValueError, OSError) as err:  # DataError is a ValueError
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        typer.echo(f"error: {message}", err=True)
        raise typer.Exit(1) from None


def _check(n: int, error_rate: float) -> None:
    if n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")
    if not 0.0 <= error_rate <= 1.0:
        raise ValueError(f"--error-rate must be in [0, 1], got {error_rate}")


def _summary(out: Path, records, by_kind: Counter) -> str:
    n_err = sum(r.label != -1 for r in records)
    kinds = ", ".join(f"{k} {c}" for k, c in sorted(by_kind.items()))
    return f"wrote {len(records)} trajectories to {out} ({n_err} with an error, {len(records) - n_err} correct; {kinds})"


@data_app.command("synthetic")
def synthetic(
    out: OutOpt,
    n: NOpt = 1000,
    seed: SeedOpt = 0,
    kinds: Annotated[Optional[str], typer.Option(help="error kinds and shares: 'carry_over=0.5,misread=0.25' or 'carry_over,misread' (default: the built-in mixture)")] = None,
    error_rate: ErrorRateOpt = 0.5,
) -> None:
    """Built-in word problems, one step per operation, an error of a known kind at a known step."""
    from actprm.model.data.records import save_processbench
    from actprm.model.data.synthetic import parse_kinds, word_problems

    with _one_line_errors():
        _check(n, error_rate)
        shares = parse_kinds(kinds) if kinds is not None else None
        records = word_problems(n, seed=seed, kinds=shares, error_rate=error_rate)
        for r in records:
            # The stated answer is right when the error was undone later or never reached it.
            if "answer" in r.extra and "stated_answer" in r.extra:
                r.extra.setdefault("final_answer_correct", r.extra["answer"] == r.extra["stated_answer"])
        save_processbench(records, out, generator="actprm-synthetic")
        typer.echo(_summary(out, records, Counter(r.extra.get("kind", "?") for r in records)), err=True)


@data_app.command("gsm8k-slips")
def gsm8k_slips_cmd(
    gsm8k: Annotated[Path, typer.Option("--gsm8k", help="GSM8K JSONL ({question, answer} per line), e.g. train.jsonl")],
    out: OutOpt,
    n: NOpt = 1000,
    seed: SeedOpt = 0,
    error_rate: ErrorRateOpt = 0.5,
) -> None:
    """GSM8K worked solutions, one step per line: some with an arithmetic slip at a known step
    and the later steps recomputed from it, the rest unmodified (label -1)."""
    from actprm.model.data.records import save_processbench
    from actprm.model.data.gsm8k_slips import gsm8k_slips, read_gsm8k

    with _one_line_errors():
        _check(n, error_rate)
        result = gsm8k_slips(read_gsm8k(gsm8k), n, seed=seed, error_rate=error_rate)
        save_processbench(result.records, out)
        line = _summary(out, result.records, Counter(r.extra["kind"] for r in result.records))
        skipped = sum(result.skipped.values())
        if skipped:
            line += f"; skipped {skipped} GSM8K records: " + "; ".join(f"{c} x {r}" for r, c in result.skipped.most_common())
        typer.echo(line, err=True)
