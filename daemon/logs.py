"""Logging, configured once: readable on a terminal, JSON lines otherwise.

Tracebacks never carry local variables (they would leak secrets and tensors into logs).
"""

from __future__ import annotations

import logging
import os
import sys

import structlog


# What every record of this process carries (role, round, model version); values may be
# callables, read when the record is written, so they are always current.
PROCESS_CONTEXT: dict[str, object] = {}


def _add_process_context(_logger, _method, event: dict) -> dict:
    for key, value in PROCESS_CONTEXT.items():
        if key not in event:
            value = value() if callable(value) else value
            if value is not None:
                event[key] = value
    return event


def configure_logging(fmt: str = "auto", verbose: bool = False) -> None:
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    level = logging.DEBUG if verbose else logging.INFO
    renderer = (structlog.processors.JSONRenderer() if use_json
                else structlog.dev.ConsoleRenderer(exception_formatter=structlog.dev.plain_traceback))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            _add_process_context,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info if use_json else structlog.processors.StackInfoRenderer(),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    # Library chatter (weight-loading bars, broker retries) stays out of the daemon's output.
    for name in ("faust", "mode", "transformers", "httpx"):
        logging.getLogger(name).setLevel(logging.ERROR if not verbose else logging.INFO)
    # While a broker is down, aiokafka logs every reconnect attempt at ERROR, ~100 lines a
    # second. The daemon says it once per check instead ("broker unreachable; holding sends and retrying", from
    # the epoch watcher); --verbose shows aiokafka's own lines.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL if not verbose else logging.INFO)
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    else:  # the same, read by transformers when a command loads it (importing it here would cost `actprm ctl` ~1 s)
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
