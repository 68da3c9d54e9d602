"""`actprm ctl`: the command line over the ctl client (streams/tools/ctl_client.py).

Reads the Kafka target and the secret, sends through the client, formats the acknowledgements.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from actprm.daemon.cli.connect import kafka_target
from actprm.daemon.cli.errors import CLIError
from actprm.streams.control import LABEL_COUNTERS, LIVE_SETTINGS, SCOPES, parse_setting, round_state
from actprm.streams.tools.ctl_client import CtlError, send_command
from actprm.client.messages import ControlAck, ControlCommand

SECRET_ENV = "ACTPRM_CONTROL_SECRET"
TRAINER_HINT = "this command is answered by the process with the trainer role; is one running?"


# --- formatting ----------------------------------------------------------------------------


def _fmt(value: Any, suffix: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:g}{suffix}"
    return f"{value}{suffix}"


def overall(acks: list[ControlAck]) -> dict[str, Any]:
    """Totals over processes; the round comes from the trainer's process."""
    states = [a.state for a in acks]

    def total(key: str) -> int:
        return sum(s.get(key) or 0 for s in states)

    keeper = next((s for s in states if "round" in s), None)
    scored = total("scored")
    served = sorted({s["served_version"] for s in states if s.get("served_version") is not None})
    out = {"processes": len(acks), "scored": scored, "selected": total("selected"),
           "selected_pct": round(100 * total("selected") / scored, 1) if scored else 0.0,
           "judged": total("judged"), "judge_failures": total("judge_failures"), "updates": total("updates"),
           "dead_lettered": total("dead_lettered"), "served_versions": served,
           "errors": sum(1 for s in states if s.get("last_error"))}
    if any("labels_received" in s for s in states):  # a trainer answered: why it trains or not
        out |= {key: total(key) for key in LABEL_COUNTERS}
    if keeper is not None:
        out |= {"round": keeper["round"], "state": keeper.get("state") or round_state(keeper),
                "budget_used": keeper["budget_used"], "budget_left": keeper["budget_left"]}
    if any(s.get("paused_consume") for s in states):
        out["state"] = "paused (all)"
    return out


STATUS_COLUMNS = ("process", "roles", "round", "state", "budget used/left", "selected", "judged/failed",
                  "judge p50", "labels recv/dup/stale/pend/replay", "updates", "served", "last error")


def status_rows(acks: list[ControlAck]) -> list[tuple[str, ...]]:
    rows = []
    for a in acks:
        s = a.state
        budget = f"{s['budget_used']}/{s['budget_left']}" if "budget_used" in s else "-"
        labels = "/".join(str(s.get(k, 0)) for k in LABEL_COUNTERS) if "labels_received" in s else "-"
        rows.append((a.process_id, a.role, _fmt(s.get("round")), s.get("state") or round_state(s), budget,
                     f"{s.get('selected', 0)} ({s.get('selected_pct', 0.0):g}%)",
                     f"{s.get('judged', 0)}/{s.get('judge_failures', 0)}", _fmt(s.get("judge_latency_p50_s"), "s"),
                     labels, _fmt(s.get("updates")), _fmt(s.get("served_version")), (s.get("last_error") or "-")[:60]))
    return rows


def format_status(acks: list[ControlAck]) -> str:
    rows = [STATUS_COLUMNS, *status_rows(acks)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(STATUS_COLUMNS))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    o = overall(acks)
    parts = [f"{o['processes']} process{'es' if o['processes'] != 1 else ''}"]
    if "round" in o:
        parts.append(f"round {o['round']} {o['state']}, budget {o['budget_used']} used / {o['budget_left']} left")
    elif "state" in o:
        parts.append(o["state"])
    parts += [f"selected {o['selected']} of {o['scored']} ({o['selected_pct']:g}%)",
              f"judged {o['judged']}, failed {o['judge_failures']}"]
    if "labels_received" in o:
        parts.append(f"labels {o['labels_received']} received, {o['labels_duplicate']} duplicate, "
                     f"{o['labels_stale_round']} stale round, {o['pending_labels']} pending, {o['labels_replayed']} replayed")
    cons = next((a.state["consolidation"] for a in acks if isinstance(a.state.get("consolidation"), dict)), None)
    if cons is not None:
        last = cons.get("last") or {}
        parts.append(f"consolidations {cons['published']} published, {cons['refused']} refused"
                     + (", one running" if cons["running"] else "")
                     + (f" (last: val F1 {last.get('val_f1')} vs served {last.get('served_val_f1')})" if last else ""))
    parts += [f"updates {o['updates']}",
              "served " + (", ".join(f"v{v}" for v in o["served_versions"]) or "-")
              + (" (versions differ)" if len(o["served_versions"]) > 1 else "")]
    if o["errors"]:
        parts.append(f"{o['errors']} with errors")
    warning = next((a.state["broker_memory_warning"] for a in acks if a.state.get("broker_memory_warning")), None)
    return "\n".join(lines) + "\noverall: " + " | ".join(parts) + (f"\nWARNING: {warning}" if warning else "")


def format_acks(acks: list[ControlAck]) -> str:
    return "\n".join(f"{'ok' if a.ok else 'FAILED':6}  {a.role:22}  {a.process_id:24}  {a.message}".rstrip()
                     for a in acks)


def status_json(acks: list[ControlAck]) -> dict[str, Any]:
    return {"processes": [a.model_dump(mode="json") for a in acks], "overall": overall(acks)}


# --- the typer sub-app ---------------------------------------------------------------------

ctl_app = typer.Typer(help="Control running daemons over the control topic (every process obeys).",
                      no_args_is_help=True)

# Kafka comes from the daemon's own Settings (ACTPRM_KAFKA__* env, --config: SASL/TLS too); these override.
BootstrapOpt = Annotated[Optional[str], typer.Option("--bootstrap", help="Kafka bootstrap servers (default: kafka.bootstrap of the settings, else 127.0.0.1:9092)")]
PrefixOpt = Annotated[Optional[str], typer.Option("--topic-prefix", help="default: kafka.topic_prefix of the settings")]
ConfigOpt = Annotated[Optional[Path], typer.Option("--config", envvar="ACTPRM_CONFIG", help="TOML settings file (the daemon's)")]
TimeoutOpt = Annotated[float, typer.Option("--timeout", envvar="ACTPRM_CONTROL__ACK_TIMEOUT_S", min=0.1,
                                           help="seconds to wait for acknowledgements")]
JsonOpt = Annotated[bool, typer.Option("--json", help="JSON for scripts")]
ScopeOpt = Annotated[str, typer.Option("--scope", help="annotate (rewards keep flowing), train, or all (stop consuming)")]


def _secret() -> str | None:
    secret = os.environ.get(SECRET_ENV) or None
    if secret is None:
        typer.echo(f"warning: {SECRET_ENV} is not set; commands are sent unsigned "
                   "(daemons with a secret will refuse them)", err=True)
    return secret


def _send(bootstrap: str | None, prefix: str | None, timeout: float, command: str, args: dict, expect: int | None = None,
          hint: str | None = None, secret: str | None = None, config: Path | None = None) -> list[ControlAck]:
    target = kafka_target(config, bootstrap, prefix)
    cmd = ControlCommand(command=command, args=args)
    try:
        return send_command(target.bootstrap, target.topic_prefix, cmd, secret, timeout, expect, **target.options)
    except CtlError as err:
        raise CLIError(f"{err}; {hint}" if hint and "no daemon answered" in str(err) else str(err)) from None


def _report(acks: list[ControlAck], as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps([a.model_dump(mode="json") for a in acks], indent=2))
    else:
        typer.echo(format_acks(acks))
    if not all(a.ok for a in acks):
        raise typer.Exit(1)


@ctl_app.command()
def status(bootstrap: BootstrapOpt = None, topic_prefix: PrefixOpt = None, timeout: TimeoutOpt = 10.0,
           as_json: JsonOpt = False,
           watch: Annotated[Optional[float], typer.Option("--watch", min=0.5, help="refresh every N seconds")] = None,
           config: ConfigOpt = None) -> None:
    """A row per process and an overall line: round, state, budget, selection, judge, updates, served version."""
    secret = _secret()
    while True:
        acks = _send(bootstrap, topic_prefix, timeout, "status", {}, secret=secret, config=config)
        if as_json:
            typer.echo(json.dumps(status_json(acks), indent=None if watch else 2, default=str))
        else:
            if watch and sys.stdout.isatty():
                typer.clear()
            typer.echo(format_status(acks))
            if watch:
                typer.echo(f"(every {watch:g}s; Ctrl-C stops)  {time.strftime('%H:%M:%S')}")
        if not watch:
            return
        time.sleep(watch)


def _check_scope(scope: str) -> str:
    if scope not in SCOPES:
        raise typer.BadParameter(f"choose one of {', '.join(SCOPES)}", param_hint="--scope")
    return scope


def _scoped(command: str, scope: str, bootstrap: str | None, topic_prefix: str | None, timeout: float, as_json: bool,
            config: Path | None) -> None:
    # Only the trainer answers annotate/train (it keeps the round); every process answers "all".
    scope = _check_scope(scope)
    just_trainer = scope != "all"
    acks = _send(bootstrap, topic_prefix, timeout, command, {"scope": scope}, expect=1 if just_trainer else None,
                 hint=TRAINER_HINT if just_trainer else None, secret=_secret(), config=config)
    _report(acks, as_json)


@ctl_app.command()
def pause(scope: ScopeOpt = "all", bootstrap: BootstrapOpt = None, topic_prefix: PrefixOpt = None,
          timeout: TimeoutOpt = 10.0, as_json: JsonOpt = False, config: ConfigOpt = None) -> None:
    """Pause annotation, training, or all consumption (no message is lost)."""
    _scoped("pause", scope, bootstrap, topic_prefix, timeout, as_json, config)


@ctl_app.command()
def resume(scope: ScopeOpt = "all", bootstrap: BootstrapOpt = None, topic_prefix: PrefixOpt = None,
           timeout: TimeoutOpt = 10.0, as_json: JsonOpt = False, config: ConfigOpt = None) -> None:
    """Undo a pause (resume all also resumes annotation and training)."""
    _scoped("resume", scope, bootstrap, topic_prefix, timeout, as_json, config)


@ctl_app.command("reset-round")
def reset_round(budget: Annotated[Optional[int], typer.Option(min=0, help="budget of the new round (default: the current one)")] = None,
                keep_pending: Annotated[bool, typer.Option("--keep-pending", help="still train labels of earlier rounds (pending and in flight)")] = False,
                bootstrap: BootstrapOpt = None, topic_prefix: PrefixOpt = None,
                timeout: TimeoutOpt = 10.0, as_json: JsonOpt = False, config: ConfigOpt = None) -> None:
    """Start a new round with fresh counters. Requests already sent to the judge are still judged;
    their labels are dropped unless --keep-pending."""
    args: dict[str, Any] = {"keep_pending": keep_pending}
    if budget is not None:
        args["budget"] = budget
    _report(_send(bootstrap, topic_prefix, timeout, "reset-round", args, expect=1, hint=TRAINER_HINT, secret=_secret(),
                  config=config), as_json)


@ctl_app.command()
def rollback(version: Annotated[int, typer.Argument(min=0, help="the version whose weights to serve again")],
             bootstrap: BootstrapOpt = None, topic_prefix: PrefixOpt = None,
             timeout: TimeoutOpt = 10.0, as_json: JsonOpt = False, config: ConfigOpt = None) -> None:
    """Serve VERSION's weights everywhere (published as a new version) and train on from it."""
    _report(_send(bootstrap, topic_prefix, timeout, "rollback", {"version": version}, expect=1, hint=TRAINER_HINT,
                  secret=_secret(), config=config), as_json)


@ctl_app.command()
def consolidate(bootstrap: BootstrapOpt = None, topic_prefix: PrefixOpt = None,
                timeout: TimeoutOpt = 10.0, as_json: JsonOpt = False, config: ConfigOpt = None) -> None:
    """Train a candidate on every label kept, beside the online loop; it is published only if it
    beats the served version on a validation slice (`ctl status` and the journal say how it went)."""
    _report(_send(bootstrap, topic_prefix, timeout, "consolidate", {}, expect=1, hint=TRAINER_HINT, secret=_secret(),
                  config=config), as_json)


@ctl_app.command("set")
def set_value(key: Annotated[str, typer.Argument(help=f"one of: {', '.join(LIVE_SETTINGS)}")],
              value: Annotated[str, typer.Argument(help="the new value")],
              bootstrap: BootstrapOpt = None, topic_prefix: PrefixOpt = None,
              timeout: TimeoutOpt = 10.0, as_json: JsonOpt = False, config: ConfigOpt = None) -> None:
    """Change a live setting in every process; the value is checked here and again by each daemon."""
    parse_setting(key, value)  # a ValueError naming the key, before anything is sent
    _report(_send(bootstrap, topic_prefix, timeout, "set", {"key": key, "value": value}, secret=_secret(), config=config),
            as_json)
