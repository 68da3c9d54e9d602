"""Labelled trajectories from user-supplied files (ProcessBench, JSONL, PRMBench).

Every record that cannot be used is counted in `LoadResult.skipped` with a reason; nothing is
dropped silently. A file that cannot be read at all raises `DataError` with a one-line
message naming the file, so a CLI can print it without a traceback.

PRMBench layout (ssmisya/PRMBench, docs/data_format.md): `modified_process` is the list of
steps that is evaluated, `error_steps` lists the wrong steps 1-based, `modified_steps` is a
list of step NUMBERS that were edited (not step texts), `modified_question` is the question
used for evaluation, `idx` the identifier, `classification` the error category. The official
release ships JSONL, so a PRMBench file is recognised by its content, not by its suffix.
It numbers records with `idx` within each error class, so classes share idx values: a
record's identity is (classification, idx), its id "<classification>_<idx>". As the official
evaluation does, each record of class "redundency" (its spelling) also yields the fully
correct sample "correct_<idx>": `original_question` with `original_process`, no wrong step.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMATS = ("auto", "processbench", "jsonl", "prmbench")
# The official PRMBench evaluation builds its "correct" samples from this class's records.
PRMBENCH_CORRECT_SOURCE = "redundency"


class DataError(ValueError):
    """A data file that cannot be used at all; the message is one line and names the file."""


@dataclass
class Record:
    id: str
    problem: str
    steps: list[str]
    label: int  # 0-based index of the first wrong step, -1 when every step is right
    extra: dict[str, Any] = field(default_factory=dict)  # generator, error_steps, classification, ...


@dataclass
class LoadResult:
    records: list[Record]
    skipped: list[tuple[str, str]]  # (record id, or "line N"/"item N" when it has none, reason)


class _Skip(Exception):
    """A record is unusable; carries the reason."""


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _read_text(path: Path) -> str:
    if not path.exists():
        raise DataError(f"{path}: file does not exist")
    if not path.is_file():
        raise DataError(f"{path}: not a regular file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({_one_line(e.reason)} at byte {e.start})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({_one_line(e.strerror or e)})") from None


def _parse_items(path: Path, text: str, layout: str) -> tuple[list[tuple[str, Any]], list[tuple[str, str]]]:
    """(position, object) pairs plus skipped lines.

    layout "array": the file must be one JSON array. "lines": JSON Lines; bad lines are skipped
    with a reason but at least one line must parse. "sniff": an array when the text opens with
    "[" or the suffix is not .jsonl and the whole text is one JSON value; JSON Lines when the
    suffix is .jsonl or the text is several JSON values (JSONL saved as .json is common).
    """
    if layout == "sniff":
        if text.lstrip().startswith("["):
            layout = "array"
        elif path.suffix.lower() == ".jsonl":
            layout = "lines"
        else:
            try:
                json.loads(text)
                layout = "array"  # one JSON value: reported below if it is not an array
            except json.JSONDecodeError as e:
                layout = "lines" if e.msg == "Extra data" else "array"
    if layout == "array":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON array of records, found a JSON {type(data).__name__}")
        return [(f"item {i}", obj) for i, obj in enumerate(data)], []
    items: list[tuple[str, Any]] = []
    skipped: list[tuple[str, str]] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue  # blank lines (a trailing newline, spacing) are not records
        try:
            items.append((f"line {lineno}", json.loads(line)))
        except json.JSONDecodeError as e:
            skipped.append((f"line {lineno}", f"not JSON ({e.msg})"))
    if not items:
        if skipped:
            raise DataError(f"{path}: not JSON Lines (no line parses as JSON; line 1: {skipped[0][1]})")
        raise DataError(f"{path}: empty file, no records")
    return items, skipped


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)  # JSON true/false must not pass as 1/0


def _check_steps(steps: Any, field_name: str) -> list[str]:
    if steps is None:
        raise _Skip(f"no steps (missing '{field_name}')")
    if not isinstance(steps, list):
        raise _Skip(f"'{field_name}' is a {type(steps).__name__}, not a list of strings")
    if not steps:
        raise _Skip("no steps (empty list)")
    for i, s in enumerate(steps):
        if not isinstance(s, str):
            raise _Skip(f"step {i} is a {type(s).__name__}, not a string")
    return list(steps)


def _check_problem(obj: dict, keys: tuple[str, ...]) -> str:
    for k in keys:
        v = obj.get(k)
        if isinstance(v, str):
            return v
    raise _Skip(f"no problem text (none of {', '.join(repr(k) for k in keys)} is a string)")


def _record_id(obj: dict, keys: tuple[str, ...]) -> str | None:
    for k in keys:
        v = obj.get(k)
        if isinstance(v, str) and v:
            return v
        if _is_int(v):
            return str(v)  # numeric ids are common in hand-made files
    return None


def _processbench_record(obj: dict, rid: str) -> Record:
    steps = _check_steps(obj.get("steps"), "steps")
    problem = _check_problem(obj, ("problem", "question"))
    key = "label" if "label" in obj else "gold_first_error"
    if key not in obj:
        raise _Skip("no label (missing 'label' / 'gold_first_error')")
    label = obj[key]
    if not _is_int(label):
        raise _Skip(f"label {label!r} is not an integer")
    if label < -1 or label >= len(steps):
        raise _Skip(f"label {label} out of range for {len(steps)} steps (must be -1..{len(steps) - 1})")
    used = {"id", "problem", "question", "steps", "label", "gold_first_error"}
    extra = {k: v for k, v in obj.items() if k not in used}
    return Record(id=rid, problem=problem, steps=steps, label=label, extra=extra)


def _prmbench_record(obj: dict, rid: str) -> Record:
    # The evaluated solution is modified_process; `modified_steps` is only accepted as step
    # texts when it really is a list of strings (in the official data it holds step numbers).
    if obj.get("modified_process") is not None:
        steps = _check_steps(obj["modified_process"], "modified_process")
        problem = _check_problem(obj, ("modified_question", "question", "original_question"))
        source = "modified_process"
    elif isinstance(obj.get("modified_steps"), list) and obj["modified_steps"] and all(
        isinstance(s, str) for s in obj["modified_steps"]
    ):
        steps = list(obj["modified_steps"])
        problem = _check_problem(obj, ("modified_question", "question", "original_question"))
        source = "modified_steps"
    elif obj.get("original_process") is not None:
        steps = _check_steps(obj["original_process"], "original_process")
        problem = _check_problem(obj, ("original_question", "question", "modified_question"))
        source = "original_process"
    else:
        raise _Skip("no steps (none of 'modified_process', 'modified_steps', 'original_process')")
    raw = obj.get("error_steps")
    if not isinstance(raw, list):
        raise _Skip("'error_steps' missing or not a list")
    error_steps: list[int] = []
    for e in raw:
        if not _is_int(e):
            raise _Skip(f"error step {e!r} is not an integer")
        if e < 1 or e > len(steps):
            raise _Skip(f"error step {e} out of range for {len(steps)} steps (1-based: 1..{len(steps)})")
        error_steps.append(e - 1)
    error_steps = sorted(set(error_steps))
    classification = obj.get("classification")
    extra = {
        "error_steps": error_steps,
        "classification": classification if isinstance(classification, str) else None,
        "source": source,
    }
    if isinstance(obj.get("reason"), str):
        extra["reason"] = obj["reason"]
    return Record(id=rid, problem=problem, steps=steps, label=error_steps[0] if error_steps else -1, extra=extra)


def _prmbench_correct_record(obj: dict, rid: str) -> Record:
    """The fully correct sample of a PRMBench record: its original question and process."""
    steps = _check_steps(obj.get("original_process"), "original_process")
    problem = _check_problem(obj, ("original_question", "question"))
    extra = {"error_steps": [], "classification": "correct", "source": "original_process"}
    return Record(id=rid, problem=problem, steps=steps, label=-1, extra=extra)


def skip_reasons(skipped: list[tuple[str, str]]) -> dict[str, int]:
    """How many records were skipped for each reason, numbers in reasons folded to N."""
    counts = Counter(re.sub(r"\d+(?!-based)", "N", reason) for _, reason in skipped)
    return dict(counts.most_common())


def _detect(path: Path, items: list[tuple[str, Any]]) -> str:
    first = next((obj for _, obj in items if isinstance(obj, dict)), None)
    if first is not None and "error_steps" in first and "steps" not in first:
        return "prmbench"
    return "jsonl" if path.suffix.lower() == ".jsonl" else "processbench"


def load_records(path: str | Path, format: str = "auto") -> LoadResult:
    """Read labelled trajectories from `path`.

    format: "processbench" (one JSON array), "jsonl" (one record per line, ProcessBench
    fields; the label may be spelled `gold_first_error`), "prmbench" (JSON array or JSONL with
    PRMBench fields), or "auto": PRMBench when the records carry `error_steps` and no `steps`
    (whatever the suffix: the official release is JSONL), else JSONL for a .jsonl file, else
    ProcessBench. For "auto" and "prmbench" an array-vs-lines layout is read off the content.
    Unusable records are skipped and listed with a reason. Duplicate ids are skipped too:
    downstream stores key trajectories by id.
    Raises DataError (one line, naming the file) when the file is missing, not JSON, or holds
    no usable record.
    """
    if format not in FORMATS:
        raise DataError(f"{path}: unknown format {format!r} (expected one of {', '.join(FORMATS)})")
    path = Path(path)
    text = _read_text(path)
    layout = {"processbench": "array", "jsonl": "lines"}.get(format, "sniff")
    items, skipped = _parse_items(path, text, layout)
    kind = _detect(path, items) if format == "auto" else format
    build = _prmbench_record if kind == "prmbench" else _processbench_record
    id_keys = ("idx", "id") if kind == "prmbench" else ("id", "idx")

    records: list[Record] = []
    seen: set[str] = set()
    for where, obj in items:
        if not isinstance(obj, dict):
            skipped.append((where, f"not a JSON object (a {type(obj).__name__})"))
            continue
        rid = raw_id = _record_id(obj, id_keys)
        if kind == "prmbench" and rid is not None and isinstance(obj.get("classification"), str):
            rid = f"{obj['classification']}_{rid}"  # idx is only unique within a class
        name = rid if rid is not None else where
        # (name in skip lists, builder, id of the record it builds)
        wanted = [(name, build, rid if rid is not None else f"{path.stem}:{where.replace(' ', '-')}")]
        if kind == "prmbench" and raw_id is not None and obj.get("classification") == PRMBENCH_CORRECT_SOURCE:
            wanted.append((f"correct_{raw_id}", _prmbench_correct_record, f"correct_{raw_id}"))
        for label, make, record_id in wanted:
            try:
                rec = make(obj, record_id)
            except _Skip as e:
                skipped.append((label, str(e)))
                continue
            if rec.id in seen:
                skipped.append((label, "duplicate id"))
                continue
            seen.add(rec.id)
            records.append(rec)
    if not records:
        why = f"; first reason: {skipped[0][0]}: {skipped[0][1]}" if skipped else ""
        raise DataError(f"{path}: no usable record ({len(skipped)} skipped{why})")
    return LoadResult(records=records, skipped=skipped)


# Keys a written record owns; an `extra` entry with one of these names is not written over them.
_PROCESSBENCH_KEYS = ("id", "generator", "problem", "steps", "final_answer_correct", "label")
_READ_AS_FIELDS = {"question", "gold_first_error"}  # the loader would take these for problem/label


def save_processbench(records: list[Record], path: str | Path, generator: str = "actprm") -> int:
    """Write `records` as one ProcessBench JSON array, atomically (a temporary file in the same
    directory, then a rename), so a reader never sees half a file and a failed write leaves an
    old file as it was. Each item: {"id", "generator", "problem", "steps",
    "final_answer_correct", "label"} (generator and final_answer_correct from `extra` when it
    has them; else `generator` and "no error"), then the other `extra` entries as top-level
    keys, which `load_records` hands back in `Record.extra`. Returns the number written.
    Raises DataError (one line, naming the file) when it cannot be written.
    """
    path = Path(path)
    items = []
    for r in records:
        item = {"id": r.id, "generator": r.extra.get("generator", generator), "problem": r.problem,
                "steps": list(r.steps), "final_answer_correct": bool(r.extra.get("final_answer_correct", r.label == -1)),
                "label": r.label}
        item.update((k, v) for k, v in r.extra.items() if k not in item and k not in _READ_AS_FIELDS)
        items.append(item)
    if path.is_dir():
        raise DataError(f"{path}: is a directory, not a file to write")
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(items, f, indent=2, ensure_ascii=False)
            f.write("\n")
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a data file is meant to be read
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise DataError(f"{path}: cannot write ({_one_line(e.strerror or e)})") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)  # whatever failed (a full disk, an extra that is not JSON), no debris is left
    return len(items)
