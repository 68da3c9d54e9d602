"""The control plane inside each daemon process: verify operator commands, obey them, answer.

Every process reads the whole one-partition control topic with a plain consumer (no group:
each process must see every command) and answers on the acks topic. Commands issued before
the process started are skipped, so an old `pause` is not replayed into a new process.

Who acts on what: the process with the trainer role keeps the round and is the single writer
of versions, so `pause/resume --scope annotate|train`, `reset-round` and `rollback` are acted
on (and answered) there only. `status`, `set` and `pause/resume --scope all` are answered by
every process.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import MutableMapping
from typing import TYPE_CHECKING, Annotated, Any

import structlog
from pydantic import TypeAdapter, ValidationError

from actprm.client import messages
from actprm.client.messages import ControlAck, ControlCommand
from actprm.streams.kafka.readers import read_from, started_reader

if TYPE_CHECKING:  # the roles load torch; `actprm ctl` imports this module and must start without it
    from actprm.streams.process import Process

log = structlog.get_logger("actprm.control")

# Settings an operator may change on a running daemon, and what else must follow the change.
LIVE_SETTINGS: dict[str, str] = {
    "selection.strategy": "selection rule (the selector is rebuilt)",
    "selection.delta_pred": "aleatoric threshold (the selector is rebuilt)",
    "selection.delta_std": "epistemic threshold (the selector is rebuilt)",
    "selection.random_rate": "rate of the random strategy (the selector is rebuilt)",
    "scorer.max_batch": "trajectories per scoring batch",
    "update.batch_size": "labels per incremental update",
    "update.max_wait_s": "update with fewer labels after this long",
    "update.min_batch": "fewest labels worth an update when the wait runs out",
    "update.canary_tolerance": "largest canary F1 drop an update may cause",
    "round.budget": "annotation budget (also of the current round)",
    "consolidate.every_labels": "labels trained between consolidations (0: only on `ctl consolidate`)",
    "consolidate.epochs": "most epochs of a consolidation (from the next one)",
    "consolidate.max_seconds": "time bound of a consolidation (from the next one)",
    "consolidate.start": "fresh (the heads' initial weights) or served (from the next one)",
}
SCOPES = ("annotate", "train", "all")
TRAINER_ONLY = {"reset-round", "rollback", "consolidate"}


# --- signing -------------------------------------------------------------------------------


def _canonical(cmd: ControlCommand) -> bytes:
    body = cmd.model_dump(mode="json", exclude={"signature"})
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _key(secret: str | bytes) -> bytes:
    return secret.encode("utf-8") if isinstance(secret, str) else secret


def sign(cmd: ControlCommand, secret: str | bytes) -> ControlCommand:
    """A copy of `cmd` carrying the HMAC-SHA256 of its canonical JSON (every field but the signature)."""
    digest = hmac.new(_key(secret), _canonical(cmd), hashlib.sha256).hexdigest()
    return cmd.model_copy(update={"signature": digest})


def verify(cmd: ControlCommand, secret: str | bytes | None, seen_nonces: MutableMapping[str, float],
           now: float, max_age_s: float) -> str | None:
    """Why `cmd` must be refused, or None; an accepted command's nonce is remembered in `seen_nonces`.

    Without a secret only freshness and replays are checked. Nonces older than the age window
    are forgotten: a replay of one is refused for its age instead.
    """
    if secret:
        if not cmd.signature:
            return "unsigned command (this daemon has a control secret)"
        expected = hmac.new(_key(secret), _canonical(cmd), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, cmd.signature):
            return "bad signature (wrong secret or altered command)"
    for nonce in [n for n, at in seen_nonces.items() if now - at > max_age_s]:
        del seen_nonces[nonce]
    age = now - cmd.issued_at
    if abs(age) > max_age_s:
        return f"issued {age:+.0f}s from now, outside the ±{max_age_s:g}s window (replay or clock skew)"
    if cmd.nonce in seen_nonces:
        return "replayed command (nonce seen before)"
    seen_nonces[cmd.nonce] = cmd.issued_at
    return None


# --- live settings -------------------------------------------------------------------------


def parse_setting(key: str, raw_value: Any) -> Any:
    """The validated value for `key`, or a ValueError naming the key; changes nothing."""
    if key not in LIVE_SETTINGS:
        raise ValueError(f"{key} cannot be set on a running daemon; live settings: {', '.join(LIVE_SETTINGS)}")
    from actprm.streams.config import SECTIONS  # the settings load torch (model/training/trainer.py): only `ctl set` needs them

    section, field = key.split(".")
    info = SECTIONS[section].model_fields[field]
    adapter = TypeAdapter(Annotated[info.annotation, *info.metadata] if info.metadata else info.annotation)
    try:
        return adapter.validate_python(raw_value)
    except ValidationError as err:
        raise ValueError(f"{key}: {messages.summarise(err) or 'invalid value'} (got {raw_value!r})") from None


def apply_setting(settings, key: str, raw_value: Any) -> Any:
    """Parse, validate and set `section.field` on `settings`; returns the new value.

    Nothing changes when the value is refused (the sections validate on assignment too).
    """
    value = parse_setting(key, raw_value)
    section, field = key.split(".")
    try:
        setattr(getattr(settings, section), field, value)
    except ValidationError as err:
        raise ValueError(f"{key}: {messages.summarise(err)}") from None
    return value


# --- obeying a command ---------------------------------------------------------------------


# The trainer's label counters: they explain a trainer that has stopped training (labels
# arriving as duplicates, or of a round closed by reset-round, or waiting).
LABEL_COUNTERS = ("labels_received", "labels_duplicate", "labels_stale_round", "pending_labels", "labels_replayed")


def process_status(proc: Process) -> dict[str, Any]:
    """proc.status() plus what the operator needs to tell processes apart and spot a stuck one."""
    now = time.time()
    st = dict(proc.status())
    if proc.trainer is not None:
        counts = proc.counters()
        for key in LABEL_COUNTERS:  # pending_labels comes from proc.status(); the others are counts
            st.setdefault(key, counts.get(key, 0))
    st |= {"process_id": proc.process_id, "roles": list(proc.roles), "paused_consume": proc.paused_consume,
           "uptime_s": round(now - proc.started_at, 1),
           "busy_s": {role: round(now - since, 1) for role, since in proc.busy_since.items() if since is not None}}
    if proc.metrics is not None:
        st |= proc.metrics.summary()
    if proc.trainer is not None and proc.trainer.consolidator is not None:
        counts = proc.counters()
        st["consolidation"] = proc.trainer.consolidator.status() | {
            "published": counts.get("consolidations", 0), "refused": counts.get("consolidations_refused", 0),
            "failed": counts.get("consolidation_failures", 0)}
    st["state"] = round_state(st)
    return st


def round_state(st: dict[str, Any]) -> str:
    if st.get("paused_consume"):
        return "paused (all)"
    paused = [name for name in ("annotate", "train") if st.get(f"paused_{name}")]
    return f"paused ({', '.join(paused)})" if paused else "running"


def _int_arg(args: dict, name: str, default: int | None = None) -> int | None:
    value = args.get(name, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return value


def _scope(args: dict) -> str:
    scope = args.get("scope", "all")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}")
    return scope


async def _pause(proc: Process, paused: bool, scope: str) -> str | None:
    rounds = proc.keeper.rounds if proc.keeper is not None else None
    if scope == "all":
        proc.paused_consume = paused
        if rounds is not None:
            rounds.pause(annotate=paused, train=paused)
            proc.trainer.wake()  # resumed: labels kept meanwhile may be due
        return ("consumption paused; offsets stay uncommitted, so nothing is lost" if paused
                else "consumption resumed")
    if rounds is None:
        return None
    rounds.pause(**{scope: paused})
    if proc.trainer is not None:
        proc.trainer.wake()
    if scope == "annotate":
        return ("annotation paused: rewards keep flowing, no new judge requests" if paused
                else "annotation resumed")
    return "training paused: labels are kept for later" if paused else "training resumed"


async def _reset_round(proc: Process, args: dict) -> str:
    budget = _int_arg(args, "budget")
    keep = bool(args.get("keep_pending", False))
    old = proc.keeper.rounds.state
    in_flight = old.used
    state = proc.keeper.rounds.new_round(budget)
    if budget is not None:
        proc.settings.round.budget = budget
    if keep:
        fate = "their labels, pending or still arriving, are trained in this round"
    else:
        dropped = await proc.trainer.drop_pending_before(state.round_id)
        fate = f"their labels are dropped ({dropped} pending dropped now, late ones on arrival; --keep-pending keeps them)"
    return (f"round {state.round_id} started with budget {state.budget}; the {in_flight} requests admitted in round "
            f"{old.round_id} are still judged and {fate}")


async def _rollback(proc: Process, args: dict) -> tuple[str, dict]:
    version = _int_arg(args, "version")
    manifest = await proc.trainer.rollback(version)  # local scorers switch at once, others on their next poll
    return (f"version {manifest.version} published with the weights of version {version}; "
            f"scorers switch to it and training continues from it"), {"version": manifest.version}


async def _set(proc: Process, args: dict) -> str:
    key, raw = args.get("key"), args.get("value")
    if not isinstance(key, str):
        raise ValueError("set needs a key")
    value = apply_setting(proc.settings, key, raw)  # the roles read their sections live
    if key.startswith("selection.") and proc.scorer is not None:
        proc.scorer.rebuild_selector()
    elif key.startswith("update.") and proc.trainer is not None:
        setattr(proc.trainer.updates, key.split(".")[1], value)
        proc.trainer.wake()  # e.g. a smaller batch_size may make an update due now
    elif key == "round.budget" and proc.keeper is not None:
        proc.keeper.set_budget(value)
    return f"{key} = {value!r}"


async def handle_command(proc: Process, cmd: ControlCommand) -> ControlAck | None:
    """Obey one verified command; None when this process has no part in it (sends no ack)."""
    is_trainer = proc.trainer is not None
    role = ",".join(proc.roles)

    def ack(ok: bool, message: str, state: dict | None = None) -> ControlAck:
        return ControlAck(command_id=cmd.id, role=role, process_id=proc.process_id, ok=ok, message=message,
                          state=state if state is not None else process_status(proc))

    try:
        if cmd.command in TRAINER_ONLY and not is_trainer:
            return None
        match cmd.command:
            case "status":
                return ack(True, "")
            case "pause" | "resume":
                message = await _pause(proc, cmd.command == "pause", _scope(cmd.args))
                return None if message is None else ack(True, message)
            case "reset-round":
                return ack(True, await _reset_round(proc, cmd.args))
            case "rollback":
                message, extra = await _rollback(proc, cmd.args)
                return ack(True, message, process_status(proc) | extra)
            case "set":
                return ack(True, await _set(proc, cmd.args))
            case "consolidate":
                return ack(True, proc.trainer.consolidate("ctl"))
    except (ValueError, KeyError, OSError, RuntimeError) as err:
        # CheckpointError is a RuntimeError: a failed rollback leaves the served version as it was.
        log.warning("control command failed", command=cmd.command, id=cmd.id, reason=str(err)[:300])
        return ack(False, str(err).splitlines()[0] if str(err) else type(err).__name__)
    return ack(False, f"unknown command {cmd.command!r}")


async def receive(proc: Process, raw: bytes | None, secret: str | None, seen_nonces: MutableMapping[str, float],
                  now: float | None = None) -> ControlAck | None:
    """Decode, verify and obey one record of the control topic; the ack to send, if any."""
    try:
        cmd = messages.decode(ControlCommand, raw)
    except messages.MessageError as err:
        log.warning("unreadable control command", reason=err.reason)
        return None
    if cmd.issued_at < proc.started_at:
        log.debug("control command from before this process started: skipped", command=cmd.command, id=cmd.id)
        return None
    now = time.time() if now is None else now
    reason = verify(cmd, secret, seen_nonces, now, proc.settings.control.max_age_s)
    if reason is not None:
        log.warning("control command rejected", command=cmd.command, id=cmd.id, reason=reason)
        return ControlAck(command_id=cmd.id, role=",".join(proc.roles), process_id=proc.process_id, ok=False,
                          message=f"rejected: {reason}")
    log.info("control command", command=cmd.command, id=cmd.id, args=cmd.args)
    return await handle_command(proc, cmd)


async def run_control_consumer(proc: Process, bootstrap: str, **kafka_options: Any) -> None:
    """Read every control command from the start of the topic, obey, ack; runs until cancelled."""
    s = proc.settings
    secret = s.control_secret.get_secret_value() if s.control_secret else None
    if not secret:
        log.warning("control commands are not authenticated: set ACTPRM_CONTROL_SECRET on daemons and ctl")
    consumer = await started_reader(bootstrap, "control consumer", **kafka_options)
    try:
        await read_from(consumer, proc.topics.control)
        seen: dict[str, float] = {}
        async for record in consumer:
            try:
                ack = await receive(proc, record.value, secret, seen)
                if ack is not None:
                    await proc.sender.send(proc.topics.acks, ack.command_id, messages.encode(ack))
            except Exception as err:  # one bad command or a failed ack must not end the control plane
                log.error("control command not handled", offset=record.offset, error=f"{type(err).__name__}: {err}"[:300])
    finally:
        await consumer.stop()
