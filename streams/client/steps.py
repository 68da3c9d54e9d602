"""Turn what an RL framework sends into a problem and a list of steps.

split_steps() cuts a raw response into steps (a separator, one step per line, or a regex).
message_text() reads the text of a prompt or completion in any shape the frameworks send: a
string, a chat message, or a conversation whose turns hold a string, None, a list of content
parts, or tool calls.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

DEFAULT_SPLIT = "\n\n"
MAX_RESPONSE_CHARS = 400_000  # ~100k tokens: far past any max_length, and a bound on regex work


class StepSplitError(ValueError):
    """A response that cannot be turned into steps; the message says why, in one line."""


@lru_cache(maxsize=64)
def _split_pattern(mode: str) -> re.Pattern | None:
    """The compiled regex of a "re:PATTERN" mode (None for the other modes); refuses bad modes."""
    if mode == "":
        raise StepSplitError("split mode must not be empty: give a separator, 'lines' or 're:PATTERN'")
    if not mode.startswith("re:"):
        return None
    try:
        pattern = re.compile(mode[3:])
    except re.error as err:
        raise StepSplitError(f"split regex {mode[3:]!r} is invalid: {err}") from None
    if pattern.fullmatch(""):
        raise StepSplitError(f"split regex {mode[3:]!r} matches the empty string, so it would split everywhere")
    return pattern


def check_split_mode(mode: str) -> str:
    """Validate a split mode without splitting anything (settings call this)."""
    _split_pattern(mode)
    return mode


def split_steps(text: str, mode: str = DEFAULT_SPLIT, *, max_steps: int = 512,
                max_chars: int = MAX_RESPONSE_CHARS) -> list[str]:
    """Cut a response into steps.

    mode: a literal separator (default a blank line, "\\n\\n"), "lines" (one step per line), or
    "re:PATTERN" (a regex that matches the separators). Steps are stripped; blank ones dropped.
    """
    if not isinstance(text, str):
        raise StepSplitError(f"response must be a string, got {type(text).__name__}")
    if len(text) > max_chars:
        raise StepSplitError(f"response has {len(text)} characters, over the limit of {max_chars}")
    pattern = _split_pattern(mode)
    if pattern is not None:
        # Spans between matches, not re.split: a pattern with groups would put the groups in the steps.
        pieces, start = [], 0
        for m in pattern.finditer(text):
            pieces.append(text[start:m.start()])
            start = m.end()
        pieces.append(text[start:])
    elif mode == "lines":
        pieces = text.splitlines()
    else:
        pieces = text.split(mode)
    steps = [p.strip() for p in pieces if p.strip()]
    if not steps:
        raise StepSplitError("response has no steps: it is empty or whitespace only")
    if len(steps) > max_steps:
        raise StepSplitError(f"response splits into {len(steps)} steps, over the limit of {max_steps}")
    return steps


def content_text(content: Any) -> str:
    """The text of one message's content: a string, None (a turn that only calls tools), or a
    list of parts ({"type": "text", "text": ...}, images and the like carry no text)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Mapping):
        return content_text(content.get("text", content.get("content")))
    if isinstance(content, Sequence):
        return "\n".join(t for t in (content_text(p) for p in content) if t)
    return str(content)


def _turn_text(turn: Mapping[str, Any]) -> str:
    text = content_text(turn.get("content"))
    calls = turn.get("tool_calls") or []
    named = [str((c.get("function") or {}).get("name") or c.get("name") or "") for c in calls if isinstance(c, Mapping)]
    if named and not text:
        return "calls " + ", ".join(n for n in named if n)  # a step that only calls tools still is a step
    return text


def message_text(message: Any, role: str) -> str:
    """Plain text of a prompt (role "user": its last user turn) or a completion (role "assistant":
    its assistant turns, each a step block): a string, one chat message, or a conversation."""
    if message is None:
        return ""
    if isinstance(message, str):
        return message
    if isinstance(message, Mapping):
        return _turn_text(message)
    if isinstance(message, Sequence) and all(isinstance(m, Mapping) for m in message):
        turns = [_turn_text(m) for m in message if m.get("role") == role]
        turns = [t for t in turns if t]
        if turns:
            return turns[-1] if role == "user" else "\n\n".join(turns)
        return "\n\n".join(t for t in (_turn_text(m) for m in message) if t)
    return str(message)
