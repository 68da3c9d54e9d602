"""The `actprm` command line. Thin commands over shared functions; errors are one line."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from actprm.daemon.cli.ctl import ctl_app
from actprm.daemon.cli.errors import CLIError
from actprm.daemon.logs import configure_logging

app = typer.Typer(help="actprm: an online active-learning Process Reward Model next to your RL run.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
bench_app = typer.Typer(help="Benchmarks that print JSON.", no_args_is_help=True)
config_app = typer.Typer(help="Settings.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
app.add_typer(config_app, name="config")
app.add_typer(ctl_app, name="ctl")

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", envvar="ACTPRM_CONFIG", help="TOML settings file")]
BackboneOpt = Annotated[Optional[str], typer.Option("--backbone", help="'tiny', 'smollm2-135m' or a local model directory")]
BootstrapOpt = Annotated[Optional[str], typer.Option("--bootstrap", help="Kafka bootstrap servers; empty: the embedded broker")]
# The operator tools read kafka.* from the same Settings as the daemon (env, --config); these override.
ToolBootstrapOpt = Annotated[Optional[str], typer.Option("--bootstrap", help="Kafka bootstrap servers (default: kafka.bootstrap of the settings, else 127.0.0.1:9092)")]
TopicPrefixOpt = Annotated[Optional[str], typer.Option("--topic-prefix", help="default: kafka.topic_prefix of the settings")]


def _nested(**flat: Any) -> dict:
    """Turn {"model.backbone": x} into {"model": {"backbone": x}}, dropping unset flags."""
    out: dict = {}
    for dotted, value in flat.items():
        if value is None:
            continue
        *parents, leaf = dotted.split("__")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def _settings(config: Path | None, **flags: Any):
    from actprm.daemon.settings import load_settings

    return load_settings(config, **_nested(**flags))


def _emit(obj: dict, as_json: bool, table: str | None = None) -> None:
    if as_json:
        typer.echo(json.dumps(obj, indent=2, default=str))
    else:
        typer.echo(table if table is not None else json.dumps(obj, indent=2, default=str))


@app.callback()
def _root(log_format: Annotated[str, typer.Option(envvar="ACTPRM_LOG_FORMAT", help="auto, json or console")] = "auto",
          verbose: Annotated[bool, typer.Option("--verbose", "-v", help="debug logs")] = False) -> None:
    configure_logging(log_format, verbose)


@app.command()
def run(
    role: Annotated[str, typer.Option(help="all, or a comma list of scorer, judge, trainer")] = "all",
    backbone: BackboneOpt = None,
    bootstrap: BootstrapOpt = None,
    max_trajectories: Annotated[Optional[int], typer.Option(min=1, help="stop after scoring this many (and training their labels)")] = None,
    synthetic: Annotated[Optional[int], typer.Option(min=0, help="produce this many built-in synthetic trajectories (default: max-trajectories on the embedded broker)")] = None,
    heldout: Annotated[int, typer.Option(min=0, help="synthetic held-out trajectories for the live F1 (0: off)")] = 32,
    budget: Annotated[Optional[int], typer.Option(min=0, help="annotation budget of the first round")] = None,
    judge: Annotated[Optional[str], typer.Option(help="oracle, openai or vllm")] = None,
    state_dir: Annotated[Optional[Path], typer.Option(help="ledgers and checkpoints")] = None,
    mode: Annotated[Optional[str], typer.Option(help="training mode: heads, lora or full")] = None,
    config: ConfigOpt = None,
) -> None:
    """Run the daemon: score -> select -> judge -> update -> hot-swap."""
    from actprm.daemon.run import RunOptions, parse_roles, run_daemon

    settings = _settings(config, kafka__bootstrap=bootstrap, model__backbone=backbone, round__budget=budget,
                         judge__kind=judge, state_dir=state_dir)
    if mode is not None:
        settings.trainer = settings.trainer.model_copy(update={"mode": mode})
    if _ENTRY:  # a process of its own (not a test's CliRunner): it can start again on another allocator
        from actprm.daemon.memory import preload_allocator

        preload_allocator(settings.allocator)
    if synthetic is None:
        # With nothing else to read, the embedded default brings its own stream.
        synthetic = (max_trajectories or 200) if not settings.kafka.bootstrap else 0
    options = RunOptions(roles=parse_roles(role), synthetic=synthetic, max_trajectories=max_trajectories, heldout=heldout)
    final = run_daemon(settings, options)
    typer.echo(json.dumps(final, indent=2, default=str))


@app.command("eval")
def evaluate(
    data: Annotated[Path, typer.Option("--data", help="ProcessBench-format JSON, JSONL, or PRMBench records")],
    checkpoint: Annotated[Optional[Path], typer.Option(help="checkpoint store (latest version) or one version directory")] = None,
    backbone: BackboneOpt = None,
    threshold: Annotated[float, typer.Option(help="a step below this score is predicted wrong")] = 0.5,
    format: Annotated[str, typer.Option("--format", help="auto, processbench, jsonl or prmbench")] = "auto",
    limit: Annotated[Optional[int], typer.Option(help="only the first N records")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object")] = False,
) -> None:
    """Score a labelled file and print ProcessBench accuracy/F1 (and PRMScore for PRMBench)."""
    from actprm.model.build import build_prm, load_prm
    from actprm.model.eval.evaluate import evaluate_file, format_eval_table

    if checkpoint is not None and backbone is not None:
        raise CLIError("give --checkpoint or --backbone, not both")
    if checkpoint is not None:
        prm, _ = load_prm(checkpoint)
    else:
        prm = build_prm(backbone or "smollm2-135m")
    result = evaluate_file(prm, data, threshold=threshold, format=format, limit=limit, progress=True)
    _emit(result, as_json, format_eval_table(result))


from actprm.daemon.cli.simulate import simulate  # noqa: E402 - light module: torch loads inside the command

app.command("simulate")(simulate)

from actprm.daemon.cli.data import data_app  # noqa: E402 - light module: the data builders load inside the commands

app.add_typer(data_app, name="data")

from actprm.daemon.cli.judge import judge_app  # noqa: E402 - light module: the judge loads inside the command

app.add_typer(judge_app, name="judge")


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise CLIError(f"expected a comma list of integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise CLIError(f"expected positive integers, got {text!r}")
    return values


@bench_app.command("model")
def bench_model_cmd(
    backbone: Annotated[str, typer.Option(help="'tiny', 'smollm2-135m', 'random:<arch>' (e.g. random:qwen2-1.5b) or a model directory")] = "tiny",
    heads: Annotated[str, typer.Option(help="head counts to compare")] = "1,8,32",
    batch: int = 8,
    tokens: int = 256,
    repeats: int = 3,
    threads: Annotated[Optional[int], typer.Option(help="torch threads (default: torch's; 1 is steadier on a busy machine)")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16 or float16")] = "auto",
    attn_implementation: Annotated[str, typer.Option(help="auto, sdpa, eager or flash_attention_2")] = "auto",
    peak_tflops: Annotated[Optional[float], typer.Option(help="the device's peak TFLOP/s for MFU (default: its bf16 datasheet figure)")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Forward time, tokens/s, MFU and peak memory per head count (goal: 32 heads <= 1.05x time, 1.10x memory of 1)."""
    from actprm.model.lab.heads_bench import bench_model

    _emit(bench_model(backbone, heads=_int_list(heads), batch=batch, tokens=tokens, repeats=repeats, threads=threads,
                      device=device, dtype=dtype, attn_implementation=attn_implementation, peak_tflops=peak_tflops), as_json)


@bench_app.command("train")
def bench_train_cmd(
    backbone: Annotated[str, typer.Option(help="whose hidden size the heads read: 'random:<arch>' (e.g. random:smollm2-135m), 'tiny' or a model directory")] = "random:smollm2-135m",
    labels: Annotated[int, typer.Option(help="labelled trajectories (3-8 steps, random hidden states)")] = 512,
    mini_batch: Annotated[int, typer.Option(help="labels per optimizer step (consolidate.mini_batch)")] = 16,
    steps: Annotated[int, typer.Option(help="optimizer steps timed per run")] = 200,
    repeats: int = 3,
    heads: Annotated[int, typer.Option(help="E")] = 32,
    threads: Annotated[Optional[int], typer.Option(help="torch threads (default: torch's)")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Heads optimizer steps per second on cached hidden states (what a consolidation's time bound buys), and validation time."""
    from actprm.model.lab.train_bench import bench_train

    if min(labels, mini_batch, steps, repeats, heads) < 1:
        raise CLIError("--labels, --mini-batch, --steps, --repeats and --heads must be >= 1")
    _emit(bench_train(backbone, labels=labels, mini_batch=mini_batch, steps=steps, repeats=repeats, n_heads=heads,
                      threads=threads), as_json)


@bench_app.command("pipeline")
def bench_pipeline_cmd(
    backbone: Annotated[str, typer.Option(help="'tiny', 'smollm2-135m' or a model directory")] = "tiny",
    trajectories: Annotated[int, typer.Option(help="trajectories pushed through the broker")] = 256,
    swaps: Annotated[int, typer.Option(help="versions published while the stream runs")] = 20,
    batch: Annotated[int, typer.Option(help="scorer batch size (scorer.max_batch)")] = 8,
    threads: Annotated[int, typer.Option(help="torch threads, the same for the model alone and the scorer")] = 1,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N (model alone and scorer)")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto, float32, bfloat16 or float16")] = "auto",
    max_batch_tokens: Annotated[int, typer.Option(help="padded tokens per scoring batch (scorer.max_batch_tokens)")] = 16384,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Model-alone vs through-the-broker tokens/s, padding waste, swap stalls, lost and duplicated rewards."""
    from actprm.streams.tools.bench_pipeline import bench_pipeline

    _emit(bench_pipeline(backbone, trajectories=trajectories, swaps=swaps, max_batch=batch, threads=threads,
                         device=device, dtype=dtype, max_batch_tokens=max_batch_tokens), as_json)


@bench_app.command("report")
def bench_report_cmd(
    labels: Annotated[int, typer.Option(help="labels in the synthetic week-long run")] = 100_000,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Seconds `actprm report` takes on a synthetic run with this many labels."""
    from actprm.daemon.bench.report import bench_report

    if labels < 1:
        raise CLIError(f"--labels must be >= 1, got {labels}")
    _emit(bench_report(labels), as_json)


@bench_app.command("soak")
def bench_soak_cmd(
    minutes: Annotated[float, typer.Option(help="how long the stream runs (after the model is loaded)")] = 10.0,
    rate: Annotated[float, typer.Option(help="trajectories per second produced")] = 90.0,
    warmup_minutes: Annotated[Optional[float], typer.Option(help="left out of the growth figures (default: min(5, minutes/3))")] = None,
    sample_s: Annotated[float, typer.Option(help="seconds between samples")] = 15.0,
    backbone: Annotated[str, typer.Option(help="the daemon's backbone")] = "tiny",
    project_rate: Annotated[float, typer.Option(help="trajectories per second of the week projected to")] = 100.0,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """A daemon on a steady stream: growth per 10,000 trajectories of each process's RSS, each state
    subdirectory, the files and the broker's memory; throughput and status latency; a week's projection."""
    from actprm.daemon.bench.soak import bench_soak, table

    if minutes <= 0 or rate <= 0 or sample_s <= 0:
        raise CLIError("--minutes, --rate and --sample-s must be > 0")
    result = bench_soak(minutes=minutes, rate=rate, warmup_minutes=warmup_minutes, sample_s=sample_s, backbone=backbone,
                        project_rate=project_rate,
                        progress=lambda s: typer.echo(json.dumps({k: v for k, v in s.items() if k != "dirs_mb"}), err=True))
    _emit(result, as_json, table(result))


@bench_app.command("store")
def bench_store_cmd(
    versions: Annotated[int, typer.Option(help="versions in the aged checkpoint store (a week at 100/s: ~189k)")] = 200_000,
    ids: Annotated[int, typer.Option(help="trajectory ids in the aged ledger")] = 10_000_000,
    labels: Annotated[int, typer.Option(help="labels trained in the aged ledger")] = 3_000_000,
    rounds: Annotated[int, typer.Option(help="updates and statuses timed on each side")] = 40,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Update and status latency on storage a week old against a fresh one (goal: within 10%)."""
    from actprm.daemon.bench.store import bench_store

    if min(versions, ids, rounds) < 1 or versions < 100:
        raise CLIError("--versions must be >= 100, --ids and --rounds >= 1")
    _emit(bench_store(versions=versions, ids=ids, labels=labels, rounds=rounds), as_json)


@app.command()
def report(
    state_dir: Annotated[Path, typer.Option(envvar="ACTPRM_STATE_DIR", help="the daemon's state dir")],
    out: Annotated[Path, typer.Option(help="the HTML file to write")] = Path("report.html"),
    checkpoint_dir: Annotated[Optional[Path], typer.Option(envvar="ACTPRM_CHECKPOINT_DIR", help="default STATE_DIR/checkpoints")] = None,
    window: Annotated[Optional[int], typer.Option(help="labels per calibration window (default: about 10 windows)")] = None,
    bins: Annotated[int, typer.Option(help="reliability-diagram bins")] = 10,
    field: Annotated[str, typer.Option(help="metadata field of the rollouts to group labels by")] = "policy_step",
) -> None:
    """Write one self-contained HTML page on how a run is going (works while it runs)."""
    from actprm.daemon.report.page import write_report

    if window is not None and window < 1 or bins < 1:
        raise CLIError("--window and --bins must be >= 1")
    path = write_report(out, state_dir, checkpoint_dir, window=window, n_bins=bins, field_name=field)
    typer.echo(str(path))


@app.command()
def broker(
    port: Annotated[int, typer.Option(min=1, max=65535, help="the port to listen on (127.0.0.1)")] = 9092,
    memory_limit_mb: Annotated[Optional[float], typer.Option(envvar="ACTPRM_BROKER_MEMORY_LIMIT_MB", help="warn at 80% of this (default: half the host's memory)")] = None,
) -> None:
    """Run the embedded broker alone on a fixed port until Ctrl-C / SIGTERM, so daemons
    (ACTPRM_KAFKA__BOOTSTRAP=127.0.0.1:PORT) restart without losing topics. Memory only, no retention."""
    from actprm.streams.kafka.broker import serve_broker

    raise typer.Exit(serve_broker(port, int(memory_limit_mb * (1 << 20)) if memory_limit_mb else None))


@app.command()
def produce(
    file: Annotated[Optional[Path], typer.Argument(help="JSONL or ProcessBench-format JSON")] = None,
    synthetic: Annotated[Optional[int], typer.Option(help="produce N built-in synthetic trajectories instead")] = None,
    seed: Annotated[Optional[int], typer.Option(min=0, help="seed of --synthetic (ids wp-SEED-i); default: a new one per call, so calls never repeat ids")] = None,
    bootstrap: ToolBootstrapOpt = None,
    topic_prefix: TopicPrefixOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Push trajectories to the trajectories topic of a broker, with a progress bar."""
    from actprm.daemon.cli.connect import kafka_target
    from actprm.streams.tools.produce import produce_trajectories, trajectories_from

    if (file is None) == (synthetic is None):
        raise CLIError("give a FILE or --synthetic N (one of them)")
    if synthetic is not None and seed is None:
        import secrets

        seed = secrets.randbelow(10**9)  # printed below, so a run can be repeated
    items, skipped = trajectories_from(file, synthetic, seed=seed or 0)
    for where, reason in skipped:
        typer.echo(f"skipped {where}: {reason}", err=True)
    target = kafka_target(config, bootstrap, topic_prefix)  # the daemon's Settings: SASL/TLS included
    n = produce_trajectories(target.bootstrap, target.topic_prefix, items, **target.options)
    typer.echo(json.dumps({"produced": n, "skipped": len(skipped)} | ({"seed": seed} if synthetic is not None else {})))


@app.command()
def tail(
    what: Annotated[str, typer.Argument(help="rewards, labels, annotations, versions or dead-letters")] = "rewards",
    limit: Annotated[Optional[int], typer.Option(help="stop after N messages")] = None,
    from_beginning: Annotated[bool, typer.Option(help="start at the oldest message")] = True,
    bootstrap: ToolBootstrapOpt = None,
    topic_prefix: TopicPrefixOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Print messages of a topic as JSON lines as they arrive."""
    from actprm.daemon.cli.connect import kafka_target
    from actprm.streams.tools.produce import tail_topic

    target = kafka_target(config, bootstrap, topic_prefix)
    tail_topic(target.bootstrap, target.topic_prefix, what, limit=limit, from_beginning=from_beginning, out=sys.stdout,
               **target.options)


@app.command()
def serve(
    host: Annotated[Optional[str], typer.Option(help="address to bind (default 127.0.0.1; set gateway.token before exposing it)")] = None,
    port: Annotated[Optional[int], typer.Option(help="port (default 5000)")] = None,
    bootstrap: Annotated[Optional[str], typer.Option("--bootstrap", help="Kafka bootstrap servers of the running daemon")] = None,
    config: ConfigOpt = None,
) -> None:
    """The reward gateway for RL trainers: OpenRLHF's POST /get_reward, POST /v1/rewards (per step), GET /healthz."""
    from actprm.daemon.gateway import serve_gateway

    settings = _settings(config, kafka__bootstrap=bootstrap, gateway__host=host, gateway__port=port)
    try:
        serve_gateway(settings)
    except RuntimeError as err:  # Kafka unreachable at start
        raise CLIError(str(err)) from None


@bench_app.command("gateway")
def bench_gateway_cmd(
    backbone: Annotated[str, typer.Option(help="'tiny', 'smollm2-135m' or a model directory")] = "tiny",
    concurrency: Annotated[str, typer.Option(help="concurrent single-sample requests (OpenRLHF's shape) to compare")] = "1,8,32",
    rounds: Annotated[int, typer.Option(help="requests per level = concurrency x rounds")] = 4,
    batch: Annotated[int, typer.Option(help="scorer batch size (scorer.max_batch)")] = 8,
    scorer_wait: Annotated[float, typer.Option(help="scorer.max_wait_s: the longest wait to fill a batch")] = 0.02,
    threads: Annotated[int, typer.Option(help="torch threads, the same for the scorer alone and the scorer process")] = 1,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Requests/s and p50/p99 latency through gateway + Kafka + scorer, beside the scorer's own batch time."""
    from actprm.daemon.bench.gateway import bench_gateway

    _emit(bench_gateway(backbone, concurrency=_int_list(concurrency), rounds=rounds, max_batch=batch,
                        max_wait_s=scorer_wait, threads=threads), as_json)


@config_app.command("show")
def config_show(config: ConfigOpt = None) -> None:
    """Print the effective settings (secrets masked)."""
    settings = _settings(config)
    typer.echo(json.dumps(settings.model_dump(mode="json"), indent=2, default=str))


# Errors that end a command with one line, by module: a class whose module was never imported
# cannot have been raised, so `main` looks them up only then (importing them would load torch
# before every command, `actprm ctl` included).
KNOWN_ERRORS = (("actprm.model.backbone", "BackboneError"), ("actprm.model.training.checkpoints", "CheckpointError"),
                ("actprm.model.data.records", "DataError"), ("actprm.model.judges.base", "JudgeError"),
                ("aiokafka.errors", "KafkaError"), ("actprm.streams.kafka.broker", "BrokerError"),
                ("actprm.client.topics", "KafkaUnreachable"), ("actprm.daemon.memory", "AllocatorError"))


def _known_errors() -> tuple[type[BaseException], ...]:
    loaded = (getattr(sys.modules.get(module), name, None) for module, name in KNOWN_ERRORS)
    return (CLIError, FileNotFoundError, ValueError, *(e for e in loaded if e is not None))


_ENTRY = False  # True when main() runs: this process is the `actprm` command itself


# A bad flag, value or command (click's UsageError: typer vendors click and exports only this
# subclass of it).
UsageError = typer.BadParameter.__base__


def main() -> None:
    from pydantic import ValidationError

    global _ENTRY
    _ENTRY = True

    try:
        # Not standalone: click would print a bad flag as a framed box; it is one line here too.
        code = app(standalone_mode=False)
        sys.exit(code if isinstance(code, int) else 0)
    except UsageError as err:
        if not err.format_message():  # a group called without a command: its help was printed
            sys.exit(err.exit_code)
        typer.echo(f"error: {err.format_message()} (see {err.ctx.command_path if err.ctx else 'actprm'} --help)", err=True)
        sys.exit(2)
    except typer.Abort:
        sys.exit(130)
    except ValidationError as err:
        for e in err.errors():
            where = ".".join(str(x) for x in e["loc"]) or "settings"
            typer.echo(f"error: {where}: {e['msg']}", err=True)
        sys.exit(1)
    except Exception as err:
        if not isinstance(err, _known_errors()):
            raise
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        typer.echo(f"error: {message}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
