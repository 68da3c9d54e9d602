"""Each RL framework's OWN code calls actprm, for real, against a real daemon on `tiny`.

TRL's GRPOTrainer trains, verl's reward loop scores a DataProto on a config composed by verl's
Hydra config, OpenRLHF's SingleTurnAgentExecutor generates and fetches its rewards over HTTP
(`actprm serve`) and from actprm's reward file. Each runs in its own virtualenv holding the
framework and the torch-free actprm client only (scripts/rl-envs builds them, scripts/test runs
it), through a script in tests/client/rl_envs/ that prints one RESULT line of JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from support.daemon import Daemon
from support.wait import wait_until
from support.paths import ROOT
from support.gateway import Gateway

pytestmark = [pytest.mark.broker, pytest.mark.slow]

RL_ENVS = ROOT / "tests" / "client" / "rl_envs"


def venv_python(name: str) -> str:
    """The python of venv NAME for the current requirement files; a clear failure when absent."""
    where = subprocess.run(["bash", str(ROOT / "scripts" / "rl-envs"), "--path", name], capture_output=True,
                           text=True, cwd=ROOT)
    assert where.returncode == 0, where.stderr
    env = Path(where.stdout.strip())
    if not (env / ".complete").exists():
        pytest.fail(f"the {name} virtualenv is missing ({env}): run scripts/rl-envs (scripts/test runs it)",
                    pytrace=False)
    return str(env / "bin" / "python")


def framework_env(**extra: str) -> dict[str, str]:
    """The test's environment minus its own Python and actprm settings, plus `extra`."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ACTPRM_", "PYTHON", "VIRTUAL_ENV", "CONDA"))}
    return {**env, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **extra}


class Framework:
    """A tests/client/rl_envs script in its framework's venv; stdout and stderr go to files."""

    def __init__(self, venv: str, script: str, *args: str, env: dict[str, str], workdir: Path):
        workdir.mkdir(parents=True, exist_ok=True)
        self.script = script
        self.out, self.err = workdir / f"{script}.stdout", workdir / f"{script}.stderr"
        self.started = time.monotonic()
        self.proc = subprocess.Popen([venv_python(venv), str(RL_ENVS / script), *args], env=env, cwd=workdir,
                                     stdout=open(self.out, "wb"), stderr=open(self.err, "wb"))

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def result(self, timeout: float) -> dict:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError(f"{self.script} still running after {timeout} s; stderr tail:\n{self.stderr()[-3000:]}") from None
        self.seconds = time.monotonic() - self.started
        lines = [x for x in self.out.read_text(errors="replace").splitlines() if x.startswith("RESULT ")]
        assert rc == 0 and lines, f"{self.script} exited {rc}; stderr tail:\n{self.stderr()[-4000:]}"
        return json.loads(lines[-1][len("RESULT "):])

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def start_daemon(bootstrap: str, prefix: str, state_dir: Path) -> Daemon:
    daemon = Daemon(bootstrap, prefix, state_dir, "--role", "scorer,trainer").start()
    wait_until(lambda: '"serving"' in daemon.stderr() or daemon.proc.poll() is not None, 120,
               what="the scorer to load its model")
    assert daemon.proc.poll() is None, f"the daemon exited: {daemon.stderr()[-3000:]}"
    return daemon


@pytest.fixture(scope="module")
def served(broker, tmp_path_factory):
    """One daemon (scorer and trainer) and one gateway for the tests that do not stop them."""
    prefix = f"t-rl-frameworks-{uuid.uuid4().hex[:8]}"
    state = tmp_path_factory.mktemp("rl-daemon")
    daemon = start_daemon(broker.bootstrap, prefix, state)
    gateway = Gateway(broker.bootstrap, prefix, state / "gateway.log")
    try:
        gateway.wait_ready()
        yield {"bootstrap": broker.bootstrap, "prefix": prefix, "daemon": daemon, "gateway": gateway}
    finally:
        gateway.stop()
        daemon.terminate()


def client_env(bootstrap: str, prefix: str, **gateway: str) -> dict[str, str]:
    """What a user exports for the client inside the trainer's environment."""
    return framework_env(ACTPRM_KAFKA__BOOTSTRAP=bootstrap, ACTPRM_KAFKA__TOPIC_PREFIX=prefix,
                         **{f"ACTPRM_GATEWAY__{k.upper()}": v for k, v in gateway.items()})


def module_file(venv: str, module: str) -> str:
    """Where a module of the client is installed in a venv (what our docs tell users to pass)."""
    out = subprocess.run([venv_python(venv), "-c", f"import {module} as m; print(m.__file__)"], capture_output=True,
                         text=True, env=framework_env(), timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


# --- TRL -----------------------------------------------------------------------------------------

def test_trl_grpo_trains_two_steps_on_actprm_rewards(served, tmp_path):
    run = Framework("trl-openrlhf", "run_trl.py", str(tmp_path / "out"), workdir=tmp_path,
                    env=client_env(served["bootstrap"], served["prefix"], timeout_s="60"))
    got = run.result(timeout=240)
    name = got["name"]
    assert name == "actprm_prm", got  # the ready function: TRL logs rewards/actprm_prm
    assert got["steps"] == 2 and len(got["reward_means"]) == 2, got
    assert all(0.0 <= m <= 1.0 for m in got["reward_means"]), got  # TRL's logged rewards/<name>/mean
    # Every completion of both steps got a reward from the daemon: none None (TRL's NaN), no fallback.
    assert [len(r) for r in got["rewards"]] == [4, 4] and all(x is not None for r in got["rewards"] for x in r), got
    assert got["fallbacks"] == [0.0, 0.0], got  # actprm/fallbacks, logged by the adapter through TRL's log_metric
    print(f"TRL: rewards/{name}/mean {got['reward_means']}, steps {got['step_s']} s, reward calls {got['reward_s']} s, "
          f"run {run.seconds:.1f} s")


def test_trl_goes_on_with_the_fallback_when_the_daemon_dies_mid_run(broker, topic_prefix, tmp_path):
    daemon = start_daemon(broker.bootstrap, topic_prefix, tmp_path / "daemon")
    pause = tmp_path / "pause"
    pause.mkdir()
    timeout_s = 5.0
    run = Framework("trl-openrlhf", "run_trl.py", str(tmp_path / "out"), "--made", "--pause-after-step-1", str(pause),
                    workdir=tmp_path, env=client_env(broker.bootstrap, topic_prefix, timeout_s=str(timeout_s)))
    try:
        wait_until(lambda: (pause / "step1").exists() or run.proc.poll() is not None, 180,
                   what="TRL to finish step 1")
        assert run.proc.poll() is None, f"run_trl.py exited early: {run.stderr()[-3000:]}"
        daemon.kill()  # SIGKILL: no goodbye; the client learns only from the missing rewards
        lines_before = len(run.stderr().splitlines())
        (pause / "go").touch()
        got = run.result(timeout=180)
    finally:
        run.kill()
        daemon.kill()
    assert got["steps"] == 2 and got["name"] == "actprm_prm", got  # make_reward_func's: rewards/actprm_prm
    assert all(x is not None for x in got["rewards"][0]) and got["fallbacks"][0] == 0.0, got  # step 1: the daemon
    assert got["rewards"][1] == [None] * 4 and got["fallbacks"][1] == 4.0, got  # step 2: the fallback, TRL skips it
    # The fallback came back by the deadline: TRL's own timing of the reward call in step 2; the
    # step as a whole adds generation and backward on a shared CPU.
    assert got["reward_s"][1] < timeout_s + 2, got
    assert got["step_s"][1] < timeout_s + 30, got
    after = run.stderr().splitlines()[lines_before:]
    client_lines = [x for x in after if "actprm" in x.lower() and not x.startswith("run_trl:")]
    assert len(client_lines) <= 5, "\n".join(client_lines[:50])
    assert len(after) <= 40, "\n".join(after[:80])  # TRL's own warning about the None rewards included
    print(f"TRL, daemon killed after step 1: steps {got['step_s']} s, reward calls {got['reward_s']} s; stderr after "
          "the kill:\n" + "\n".join(after))


# --- verl ----------------------------------------------------------------------------------------

VERL_KEYS = {"score", "ok", "prm_steps", "prm_version"}  # every sample's, whether it was scored or not


def test_verl_reward_loop_scores_through_the_documented_flags(served, tmp_path):
    path = module_file("verl", "actprm.client.verl")
    documented = [f"reward.custom_reward_function.path={path}", "reward.custom_reward_function.name=compute_score"]
    cases = [
        {"name": "documented", "overrides": documented},
        {"name": "pkg", "overrides": ["reward.custom_reward_function.path=pkg://actprm.client.verl"]},
        {"name": "legacy", "overrides": [f"custom_reward_function.path={path}", "custom_reward_function.name=compute_score"]},
        {"name": "legacy_unknown_source", "data_source": "my/math-prompts",
         "overrides": [f"custom_reward_function.path={path}", "custom_reward_function.name=compute_score"]},
        {"name": "legacy_migrated", "overrides": [f"custom_reward_function.path={path}",
                                                  "custom_reward_function.name=compute_score"], "migrate": True},
    ]
    run = Framework("verl", "run_verl.py", str(tmp_path / "tokenizer"), json.dumps(cases), workdir=tmp_path,
                    env=client_env(served["bootstrap"], served["prefix"], timeout_s="60"))
    got = run.result(timeout=240)["cases"]

    def actprm_scored(case: dict) -> None:
        assert case["compute_score_file"] == path, case  # verl's reward manager calls actprm's function
        assert len(case["outputs"]) == 4, case
        for out in case["outputs"]:
            info = out["reward_extra_info"]
            assert set(info) == VERL_KEYS, out
            assert info["ok"] is True and 0.0 <= out["reward_score"] == info["score"] <= 1.0, out
            assert info["prm_steps"] == 3 and info["prm_version"] >= 0, out  # three blank-line steps per solution

    # reward.custom_reward_function.path/.name, as our docs give them: actprm scores every sample.
    assert got["documented"]["reward_fn_config"] == {"path": path, "name": "compute_score"}
    actprm_scored(got["documented"])
    assert all(case["error"] is None for name, case in got.items() if name != "legacy_unknown_source"), got
    # The module by name works too (verl's load_module takes pkg://), and name defaults to compute_score.
    assert got["pkg"]["reward_fn_config"] == {"path": "pkg://actprm.client.verl", "name": "compute_score"}
    assert got["pkg"]["compute_score"] == "actprm.client.verl.compute_score"
    assert all(o["reward_extra_info"]["ok"] for o in got["pkg"]["outputs"])
    # The legacy top-level custom_reward_function.* keys compose without an error, but verl 0.9.1's
    # main_ppo path leaves them where they are: the reward loop reads reward.custom_reward_function,
    # finds no path, and scores with verl's own rule for the data source (gsm8k): actprm is never called.
    legacy = got["legacy"]
    assert legacy["legacy_fn_config"]["path"] == path and legacy["reward_fn_config"]["path"] is None
    assert legacy["compute_score"] == "verl.utils.reward_score.default_compute_score"
    assert all(set(o["reward_extra_info"]) == {"acc"} for o in legacy["outputs"]), legacy
    # ...and for a data source verl has no rule for, its scorer raises: the training step fails.
    unknown = got["legacy_unknown_source"]
    assert unknown["outputs"] is None and unknown["error"].startswith("NotImplementedError: Reward function is not "
                                                                      "implemented for data_source="), unknown
    # Only verl's fully async trainer migrates them (migrate_legacy_reward_impl), and then actprm scores.
    assert got["legacy_migrated"]["reward_fn_config"] == {"path": path, "name": "compute_score"}
    actprm_scored(got["legacy_migrated"])
    print(f"verl: scores {[o['reward_score'] for o in got['documented']['outputs']]}, run {run.seconds:.1f} s")


def test_verl_fallback_has_the_keys_verl_collects(broker, tmp_path):
    """verl stacks each reward_extra_info key across the batch (agent_loop.py), taking the keys of
    the first sample: a failed sample must answer the same keys, with ok false."""
    path = module_file("verl", "actprm.client.verl")
    cases = [{"name": "away", "overrides": [f"reward.custom_reward_function.path={path}"]}]
    # No daemon serves this prefix: no reward comes back by the deadline.
    run = Framework("verl", "run_verl.py", str(tmp_path / "tokenizer"), json.dumps(cases), workdir=tmp_path,
                    env=client_env(broker.bootstrap, f"t-nobody-{uuid.uuid4().hex[:8]}", timeout_s="3"))
    got = run.result(timeout=120)["cases"]["away"]
    for out in got["outputs"]:
        info = out["reward_extra_info"]
        assert set(info) == VERL_KEYS and info["ok"] is False and out["reward_score"] == info["score"] == 0.0, out
        assert info["prm_steps"] == 0 and info["prm_version"] == -1, out
    assert run.seconds < 60, run.seconds


# --- OpenRLHF ------------------------------------------------------------------------------------

def check_openrlhf_sample(s: dict) -> None:
    # OpenRLHF's executor copies rewards/scores/extra_logs from the answer; None means it failed
    # (it logs "Failed to fetch reward" and goes on without one).
    reward = s["reward"][0] if isinstance(s["reward"], list) else s["reward"]
    score = s["scores"][0] if isinstance(s["scores"], list) else s["scores"]
    assert reward is not None and 0.0 <= reward <= 1.0 and 0.0 <= score <= 1.0, s
    logs = s["extra_logs"]
    # From the daemon, not the fallback (prm_ok 0, prm_failure the reason).
    assert logs["prm_ok"] == [1.0] and logs["prm_steps"][0] >= 1 and logs["prm_version"][0] >= 0, s


def test_openrlhf_executor_gets_rewards_over_http_and_from_the_reward_file(served, tmp_path):
    reward_file = module_file("trl-openrlhf", "actprm.client.openrlhf")
    http = served["gateway"].url + "/get_reward"
    run = Framework("trl-openrlhf", "run_openrlhf.py", http, reward_file, workdir=tmp_path,
                    env=client_env(served["bootstrap"], served["prefix"], timeout_s="60"))
    got = run.result(timeout=240)
    runs = {(r["file_mode"], r["kind"]): r for r in got["runs"]}
    assert set(runs) == {(False, "short"), (False, "long"), (True, "short"), (True, "long")}
    for (file_mode, kind), r in runs.items():
        for s in r["samples"]:
            check_openrlhf_sample(s)
        if kind == "long":
            (s,) = r["samples"]
            # OpenRLHF cut the prompt from the left, so the query does not start with it; the reward
            # still came from the daemon, not the fallback.
            assert s["kept_prompt_tokens"] < s["prompt_tokens"] and not s["query_starts_with_prompt"], s
        else:
            assert len(r["samples"]) == 4 and all(s["query_starts_with_prompt"] for s in r["samples"]), r
    print(f"OpenRLHF: rewards {[[s['reward'] for s in r['samples']] for r in got['runs']]}, run {run.seconds:.1f} s")


def test_openrlhf_prompt_cut_inside_a_character_still_gets_its_reward(served, tmp_path):
    reward_file = module_file("trl-openrlhf", "actprm.client.openrlhf")
    run = Framework("trl-openrlhf", "run_openrlhf.py", served["gateway"].url + "/get_reward", reward_file,
                    "--kinds", "cut-mid-char", workdir=tmp_path,
                    env=client_env(served["bootstrap"], served["prefix"], timeout_s="60"))
    got = run.result(timeout=240)
    assert [len(r["samples"]) for r in got["runs"]] == [1, 1], got
    for r in got["runs"]:
        (s,) = r["samples"]
        assert s["query_head"].startswith("\ufffd") and s["kept_prompt_tokens"] < s["prompt_tokens"], s
        check_openrlhf_sample(s)
