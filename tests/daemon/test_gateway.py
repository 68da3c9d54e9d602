"""The reward gateway: plain request/answer functions, then real HTTP to `actprm serve` over a
real broker and a real scorer daemon on `tiny`, stopped and restarted."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from actprm.daemon.bench.gateway import _scorer_batches, bench_gateway
from actprm.client.messages import Reward
from actprm.client.openrlhf import QueryError, openrlhf_answer, query_items, split_query
from actprm.client.outcome import Outcome
from actprm.client.topics import Topics
from support.daemon import Daemon, read_topic
from support.wait import wait_until
from support.gateway import Gateway

PROMPT = "<|im_start|>user\nWhat is 2+3*4?<|im_end|>\n<|im_start|>assistant\n"
RESPONSE = "3*4 = 12.\n\n2 + 12 = 14.\n\nThe answer is \\boxed{14}."
TOKEN = "test-token"


def test_split_query_by_prompt_prefix_its_left_cut_tail_or_marker():
    assert split_query(PROMPT + RESPONSE, PROMPT, None) == (PROMPT, RESPONSE)
    # OpenRLHF cuts a long prompt from the left before generating: the query starts with its tail.
    long_prompt = "Some context. " * 20 + PROMPT
    assert split_query(long_prompt[-40:] + RESPONSE, long_prompt, None) == (long_prompt, RESPONSE)
    # A byte-level tokenizer may cut inside a character: the query then starts with U+FFFD.
    assert split_query("\ufffd" + long_prompt[-40:] + RESPONSE, long_prompt, None) == (long_prompt, RESPONSE)
    marker = "<|im_start|>assistant\n"
    assert split_query("chat:" + PROMPT + RESPONSE, None, marker) == ("chat:" + PROMPT[:-len(marker)], RESPONSE)
    with pytest.raises(QueryError, match="nor with a left-cut tail of it; set gateway.response_marker"):
        split_query("other text", PROMPT, None)
    items, bad = query_items(["other text", PROMPT + RESPONSE], [PROMPT, PROMPT], None)
    assert items[0] is None and bad[0].failure == "invalid" and items[1] == {"problem": PROMPT, "response": RESPONSE}


def test_openrlhf_answer_has_its_keys_numeric_logs_and_the_fallback_with_its_reason():
    r = Reward(id="x", mu=[0.9, 0.4], sigma=[0.1, 0.2], first_error=1, selected=True, model_version=3, n_steps=2,
               truncated=False, round_id=0)
    got = openrlhf_answer([Outcome(r), Outcome(None, "unavailable", "no reward within 5s")], "min", -1.0)
    assert set(got) == {"rewards", "scores", "extra_logs", "errors"} and got["rewards"] == got["scores"] == [0.4, -1.0]
    # OpenRLHF turns every extra_logs value into a tensor: numbers only.
    assert all(len(v) == 2 and all(isinstance(x, float) for x in v) for v in got["extra_logs"].values())
    assert got["extra_logs"]["prm_ok"] == [1.0, 0.0] and got["extra_logs"]["prm_failure"] == [0.0, 1.0]
    assert got["errors"] == [None, "no reward within 5s"]


def test_bench_reads_how_the_scorer_batched_each_wave(tmp_path):
    # One `scoring` journal record per chunk, stamped when it is scored: inside its wave's window.
    (tmp_path / "learning").mkdir()
    lines = [{"at": 9.0, "scored": 1}, {"at": 10.5, "scored": 8}, {"at": 20.2, "scored": 1}, {"at": 20.9, "scored": 7}]
    (tmp_path / "learning" / "scoring.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert _scorer_batches(tmp_path, [(10.0, 11.0), (20.0, 21.0)], expected=16) == [[8], [1, 7]]
    # Fewer scored than expected (the journal is written by a thread): it waits, then says what it saw.
    assert _scorer_batches(tmp_path, [(30.0, 31.0)], expected=1, wait_s=0.2) == [[]]


@pytest.mark.broker
@pytest.mark.slow
def test_bench_gateway_times_each_wave_alone_and_through_the_gateway():
    out = bench_gateway("tiny", concurrency=(2,), rounds=2, max_batch=2)
    (level,) = out["levels"]
    assert level["failed"] == 0 and level["requests"] == 4
    assert level["p50_ms"] > 0 and level["scorer_batch_ms"] > 0
    assert level["ratio_p50"] == pytest.approx(level["p50_ms"] / level["scorer_batch_ms"], rel=0.01)
    assert [sum(b) for b in level["scorer_batches"]] == [2, 2]  # every wave's samples scored, in its window
    assert level["waves_split"] == sum(len(b) > 1 for b in level["scorer_batches"])  # 2 per wave fit one batch


@pytest.mark.broker
@pytest.mark.slow
def test_gateway_over_a_real_daemon(broker, topic_prefix, tmp_path):
    daemon = Daemon(broker.bootstrap, topic_prefix, tmp_path / "daemon", "--role", "scorer,trainer").start()
    gateway = Gateway(broker.bootstrap, topic_prefix, tmp_path / "gw", ACTPRM_GATEWAY__TOKEN=TOKEN,
                      ACTPRM_GATEWAY__TIMEOUT_S="4", ACTPRM_GATEWAY__OUTAGE_TIMEOUT_S="1",
                      ACTPRM_GATEWAY__MAX_STEPS="16")
    try:
        gateway.wait_ready()
        wait_until(lambda: '"serving"' in daemon.stderr(), 120, what="the scorer to load its model")
        single = {"query": [PROMPT + RESPONSE], "prompts": [PROMPT], "labels": ["14"]}
        wait_until(lambda: gateway.post("/get_reward", single, timeout=30).json()["extra_logs"]["prm_ok"] == [1.0], 120,
                   what="a first reward through the gateway")

        # OpenRLHF's exact request, one sample and a batch: its answer keys, one value per sample.
        for n in (1, 4):
            body = {"query": [PROMPT + RESPONSE] * n, "prompts": [PROMPT] * n, "labels": ["14"] * n}
            got = gateway.post("/get_reward", body)
            assert got.status_code == 200, got.text
            answer = got.json()
            assert set(answer) == {"rewards", "scores", "extra_logs", "errors"}
            assert len(answer["rewards"]) == len(answer["scores"]) == n
            assert all(0.0 <= x <= 1.0 for x in answer["scores"])
            assert all(len(v) == n for v in answer["extra_logs"].values())
            assert answer["extra_logs"]["prm_steps"] == [3.0] * n and answer["extra_logs"]["prm_ok"] == [1.0] * n
        # A prompt OpenRLHF cut from the left still finds its response.
        long_prompt = "Background: " + "the numbers are small. " * 30 + PROMPT
        cut = gateway.post("/get_reward", {"query": [long_prompt[-60:] + RESPONSE], "prompts": [long_prompt]}).json()
        assert cut["extra_logs"]["prm_ok"] == [1.0] and cut["extra_logs"]["prm_steps"] == [3.0]

        # Per step: one score per split step, in input order.
        items = [{"prompt": "What is 1+1?", "response": "1+1 = 2.\n\nSo \\boxed{2}."},
                 {"problem": "What is 2*5?", "steps": ["2*5 = 10", "So 10", "\\boxed{10}", "done"]},
                 {"prompt": "Say 3.", "response": "3"}]
        got = gateway.post("/v1/rewards", {"items": items})
        assert got.status_code == 200, got.text
        out = got.json()["items"]
        assert [len(i["mu"]) for i in out] == [len(i["sigma"]) for i in out] == [2, 4, 1]
        assert all(i["ok"] and i["reward"] == min(i["mu"]) and i["model_version"] == 0 for i in out)
        assert len({i["id"] for i in out}) == 3

        # One bad sample gets the fallback and its reason; the others in its request are scored.
        mixed = gateway.post("/v1/rewards", {"items": [items[0], {"prompt": "p", "response": "\n\n".join(["s"] * 17)},
                                                      {"problem": "p"}, {"id": "x", "problem": "p", "steps": ["a"]}]})
        assert mixed.status_code == 200, mixed.text
        ok, too_many, no_steps, with_id = mixed.json()["items"]
        assert ok["ok"] and ok["mu"] == out[0]["mu"]  # the same sample: the same id, the same reward
        assert not too_many["ok"] and "17 steps, over the limit of 16" in too_many["error"] and too_many["reward"] == 0.0
        assert not no_steps["ok"] and "give steps" in no_steps["error"]
        assert not with_id["ok"] and "ids come from the content" in with_id["error"]
        bad_query = gateway.post("/get_reward", {"query": ["other text", PROMPT + RESPONSE], "prompts": [PROMPT, PROMPT]})
        assert bad_query.json()["extra_logs"]["prm_ok"] == [0.0, 1.0] and "left-cut tail" in bad_query.json()["errors"][0]

        # A request malformed as a whole: 422 with the reason; no token: 401.
        assert gateway.post("/get_reward", content=b"{not json").status_code == 422
        missing = gateway.post("/get_reward", {"prompts": [PROMPT]})
        assert missing.status_code == 422 and "query: Field required" in missing.json()["detail"]
        assert gateway.post("/get_reward", {"query": ["a", "b"], "prompts": ["a"]}).status_code == 422
        assert gateway.post("/get_reward", single, token=None).status_code == 401
        assert gateway.post("/get_reward", single, token="wrong").status_code == 401

        # The daemon stopped: the fallback within the deadline, saying so, never an error OpenRLHF
        # would retry five times; the next call, inside the outage, waits only the outage deadline.
        assert daemon.terminate() == 0
        fresh = {"query": [PROMPT + "7 * 2 = 14.\n\nSo 14."], "prompts": [PROMPT]}
        started = time.monotonic()
        late = gateway.post("/get_reward", fresh)
        assert late.status_code == 200 and time.monotonic() - started < 4 + 3
        assert late.json()["rewards"] == [0.0] and late.json()["extra_logs"]["prm_ok"] == [0.0]
        assert late.json()["extra_logs"]["prm_failure"] == [1.0]
        started = time.monotonic()
        assert gateway.post("/get_reward", fresh).json()["extra_logs"]["prm_ok"] == [0.0]
        assert time.monotonic() - started < 1 + 3
        scrape = httpx.get(gateway.url + "/metrics", timeout=10).text  # counted, for Prometheus
        assert "actprm_gateway_outage 1.0" in scrape
        (fallbacks,) = [line.split()[1] for line in scrape.splitlines() if line.startswith("actprm_gateway_fallbacks_total ")]
        assert float(fallbacks) >= 2

        # Restarted, the same request gets its reward: the sample that timed out was scored after all.
        daemon.start()
        wait_until(lambda: gateway.post("/get_reward", fresh, timeout=30).json()["extra_logs"]["prm_ok"] == [1.0], 180,
                   interval=1, what="the gateway to answer after the daemon restarted")
        rewards = read_topic(broker.bootstrap, Topics(topic_prefix).rewards, settle_s=0.5, timeout_s=30)
        assert len([r for r in rewards if r.n_steps == 2 and r.mu]) >= 1
    finally:
        gateway.stop()
        daemon.terminate()
