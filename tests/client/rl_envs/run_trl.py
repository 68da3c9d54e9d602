"""TRL's own GRPOTrainer, 2 steps on CPU, with actprm's TRL reward function as its only reward.

Runs inside the trl-openrlhf virtualenv (scripts/rl-envs): TRL, torch and the actprm client,
no actprm daemon code. Settings come from the environment (ACTPRM_KAFKA__*, ACTPRM_GATEWAY__*).

    python run_trl.py OUTPUT_DIR [--made] [--pause-after-step-1 DIR]

--made: the reward function is make_reward_func() (settings read at once, its own name) instead
of the ready reward_func.

--pause-after-step-1 DIR: after step 1, write DIR/step1 and wait (up to 120 s) for DIR/go, so the
test can stop the daemon between the two steps.

Last stdout line: RESULT {"steps", "log" (TRL's per-step logs), "rewards" (the per-completion
rewards of each step, None for TRL's NaN), "fallbacks" (actprm/fallbacks per step), "step_s" (wall
time of each step), "reward_s" (TRL's timing of the reward calls in each step), ...}.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import tiny

tiny.offline()

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import TrainerCallback  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from trl.extras import profiling  # noqa: E402

from actprm.client.trl import make_reward_func, reward_func  # noqa: E402  (the adapter under test)

# TRL times each reward function call itself (profiling_context around `await func(...)`) but
# only reports it to wandb/mlflow/trackio: keep its figures too.
TIMINGS: list[tuple[str, float]] = []
_log_metrics = profiling.ProfilingContext._log_metrics


def _keep_timing(self, duration: float) -> None:
    TIMINGS.append((self.name, duration))
    _log_metrics(self, duration)


profiling.ProfilingContext._log_metrics = _keep_timing


class Steps(TrainerCallback):
    """Wall time per step, TRL's logs as they come, and the optional pause after step 1."""

    def __init__(self, pause_dir: Path | None, name: str):
        self.pause_dir = pause_dir
        self.name = name
        self.started: float | None = None
        self.step_s: list[float] = []
        self.reward_s: list[float] = []  # TRL's own timing of the reward function's calls, per step
        self.rewards: list[list[float | None]] = []
        self.logs: list[dict] = []
        self.trainer = None

    def on_step_begin(self, args, state, control, **kwargs):
        self.started = time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):
        self.step_s.append(round(time.monotonic() - self.started, 3))
        calls = [d for name, d in TIMINGS if name.endswith("." + self.name)]
        self.reward_s.append(round(sum(calls), 3))
        TIMINGS.clear()
        per_completion = list(self.trainer._logs["rewards"][self.name])  # TRL's own record
        self.rewards.append([None if math.isnan(r) else r for r in per_completion])
        print(f"run_trl: step {state.global_step} done in {self.step_s[-1]} s", file=sys.stderr, flush=True)
        if state.global_step == 1 and self.pause_dir is not None:
            (self.pause_dir / "step1").touch()
            deadline = time.monotonic() + 120
            while not (self.pause_dir / "go").exists():
                if time.monotonic() > deadline:
                    raise SystemExit("run_trl: nobody wrote the go file within 120 s")
                time.sleep(0.05)
            print("run_trl: resuming for step 2", file=sys.stderr, flush=True)

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir")
    parser.add_argument("--pause-after-step-1", type=Path)
    parser.add_argument("--made", action="store_true")
    opts = parser.parse_args()
    func = make_reward_func() if opts.made else reward_func

    tok = tiny.tokenizer()
    model = tiny.causal_lm(tok)
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": q}], "solution": a}
                              for q, _, a in tiny.PROBLEMS])
    config = GRPOConfig(
        output_dir=opts.output_dir, max_steps=2, per_device_train_batch_size=4, num_generations=4,
        max_completion_length=24, learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to="none",
        use_cpu=True, bf16=False, disable_tqdm=True, seed=0, dataloader_num_workers=0,
    )
    steps = Steps(opts.pause_after_step_1, func.__name__)
    trainer = GRPOTrainer(model=model, reward_funcs=[func], args=config, train_dataset=data,
                          processing_class=tok, callbacks=[steps])
    steps.trainer = trainer
    started = time.monotonic()
    out = trainer.train()
    name = trainer.reward_func_names[0]
    per_step = [log for log in steps.logs if f"rewards/{name}/mean" in log]
    tiny.result(steps=trainer.state.global_step, train_loss=out.training_loss, name=name,
                reward_means=[log[f"rewards/{name}/mean"] for log in per_step],
                fallbacks=[log.get("actprm/fallbacks") for log in per_step],  # the adapter's log_metric
                rewards=steps.rewards, step_s=steps.step_s, reward_s=steps.reward_s, total_s=round(time.monotonic() - started, 3),
                torch=torch.__version__)


if __name__ == "__main__":
    main()
