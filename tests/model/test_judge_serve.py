"""The openai judge against a real OpenAI-compatible server process: transformers' own
`transformers serve`, with a tiny random chat model built in code and saved to a temp dir.

A random model writes noise, so nothing it says may become a label: the parse rate is 0,
every call is a judge failure whose answer is kept, and `actprm judge check` reports that
figure on a small gold file. (What a real small model writes, echoes of the instruction
included, is pinned by the recorded answers in tests/model/fixtures/judge_outputs/.)
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from actprm.client import messages
from actprm.client.messages import AnnotationRequest, DeadLetter, Label
from actprm.client.topics import Topics
from actprm.streams.config import JudgeSettings, SelectionSettings
from actprm.streams.roles.judging import JudgeRole, VerdictLog, configured_judge, read_verdicts
from actprm.streams.state.ledger import Ledger
from actprm.streams.kafka.sender import Event
from actprm.streams.tools.produce import synthetic_trajectories
from support.network import free_port
from support.processes import stop
from support.roles import memory_sender, sent_to

pytestmark = pytest.mark.slow


def _transformers_cli() -> str | None:
    here = Path(sys.executable).with_name("transformers")
    return str(here) if here.is_file() else shutil.which("transformers")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(base_url, model name) of `transformers serve` with a tiny random model."""
    from transformers.utils.import_utils import is_serve_available

    cli = _transformers_cli()
    if cli is None or not is_serve_available():
        pytest.skip(reason="`transformers serve` needs transformers[serving] (fastapi, uvicorn, openai): pip install -e '.[dev]'")
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from actprm.model.backbone import build_tiny_tokenizer

    directory = tmp_path_factory.mktemp("tiny-chat")
    tokenizer = build_tiny_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=8192,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    port = free_port()
    log = (directory / "serve.log").open("w")
    proc = subprocess.Popen([cli, "serve", str(directory), "--port", str(port), "--device", "cpu",
                             "--log-level", "warning"], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"})
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"transformers serve exited: {(directory / 'serve.log').read_text()[-2000:]}")
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("transformers serve did not answer /health within 180 s")
            time.sleep(0.3)
        yield f"{base}/v1", str(directory)
    finally:
        stop(proc)
        log.close()


def settings(served, **kw) -> JudgeSettings:
    base_url, model = served
    return JudgeSettings(kind="openai", base_url=base_url, model=model, timeout_s=60, max_retries=0, max_tokens=24,
                         concurrency=2, **kw)


def test_a_real_server_with_a_model_that_writes_noise_gives_no_label_and_keeps_what_it_said(served, tmp_path):
    topics = Topics("serve")
    reqs = [AnnotationRequest(id=t.id, problem=t.problem, steps=t.steps, gold_first_error=t.gold_first_error,
                              round_id=0, model_version=0, mu=[0.5] * len(t.steps))
            for t in synthetic_trajectories(4, seed=11)]
    sender, sent = memory_sender(topics.dead_letters)
    s = settings(served)
    judging = JudgeRole(configured_judge(s), Ledger(tmp_path / "ledger"), sender, topics, SelectionSettings(),
                        settings=s, audit=VerdictLog(tmp_path / "judge"))

    async def go():
        await judging.on_annotations([Event(topics.annotations, 0, i, r.id.encode(), messages.encode(r))
                                      for i, r in enumerate(reqs)])
        await judging.aclose()

    asyncio.run(go())
    assert not sent_to(sent, topics.labels, Label), "noise became a label"
    dead = sent_to(sent, topics.dead_letters, DeadLetter)
    assert {d.key for d in dead} == {r.id for r in reqs}
    assert all(d.reason.startswith("judge failed: unparseable judge answer") for d in dead), [d.reason for d in dead]
    assert all(d.judge_answer is not None for d in dead)  # what the model wrote, kept for the audit
    log = list(read_verdicts(tmp_path / "judge"))
    assert len(log) == 4 and all(e["outcome"] == "dead" and e["latency_s"] > 0 for e in log)
    assert judging.counts["judge_failures"] == 4 and judging.errors.message.startswith("judge: unparseable")


def test_judge_check_on_a_small_gold_file_reports_the_true_figure(served, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from actprm.daemon.cli.main import app

    gold = [{"id": t.id, "problem": t.problem, "steps": t.steps, "label": t.gold_first_error}
            for t in synthetic_trajectories(6, seed=12)]
    assert {g["label"] == -1 for g in gold} == {True, False}
    path = tmp_path / "gold.json"
    path.write_text(json.dumps(gold))
    base_url, model = served
    for key, value in {"KIND": "openai", "BASE_URL": base_url, "MODEL": model, "MAX_TOKENS": "24",
                       "MAX_RETRIES": "0", "CONCURRENCY": "2"}.items():
        monkeypatch.setenv(f"ACTPRM_JUDGE__{key}", value)
    result = CliRunner().invoke(app, ["judge", "check", "--data", str(path), "--json"])
    assert result.exit_code == 0, result.output
    figures = json.loads(result.stdout)
    assert figures["n"] == 6 and figures["judge"] == f"openai:{model}"
    assert figures["parse_rate"] == 0.0 and figures["f1"] == 0.0 and figures["agreement"] == 0.0
    assert figures["latency_p50_s"] > 0 and figures["latency_p99_s"] >= figures["latency_p50_s"]
    assert sum(figures["failures"].values()) == 6
