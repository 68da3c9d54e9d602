"""verl's own reward loop (verl/experimental/reward_loop/reward_loop.py, RewardLoopWorker) on a
config composed by verl's own Hydra config (verl/trainer/config/ppo_trainer.yaml, as
`python -m verl.trainer.main_ppo KEY=VALUE ...` composes it) with the flags our docs give.

Runs inside the verl virtualenv (scripts/rl-envs). The worker is used as a plain class (verl
makes it a Ray actor; the code it runs is the same) and scores a DataProto built the way verl's
agent loop builds one for the reward loop (AgentLoopWorker._compute_score): prompt and response
token ids, an attention mask, and the dataset row's non-tensor fields (data_source,
reward_model.ground_truth, extra_info with the question, raw_prompt).

    python run_verl.py TOKENIZER_DIR '[{"name": ..., "overrides": ["KEY=VALUE", ...], "migrate": false}, ...]'

Each case composes its own config and worker. "migrate": apply verl's migrate_legacy_reward_impl
to the composed config first, as verl's fully async trainer (fully_async_main.py) does;
"data_source": the rows' data_source (default openai/gsm8k, which verl's own scorer knows).

Last stdout line: RESULT {"cases": {NAME: {"reward_fn_config", "legacy_fn_config",
"compute_score" (the function verl's reward manager calls), "outputs": [{"reward_score",
"reward_extra_info"}, ...] or null, "error": what compute_score_batch raised, or null}}}.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
from pathlib import Path

import tiny

tiny.offline()

import numpy as np  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from tensordict import TensorDict  # noqa: E402
from verl.experimental.reward_loop.reward_loop import RewardLoopWorker, migrate_legacy_reward_impl  # noqa: E402
from verl.protocol import DataProto  # noqa: E402

DATA_SOURCE = "openai/gsm8k"  # a source verl's default scorer knows, so the legacy case shows which one ran


def verl_config(overrides: list[str], migrate: bool):
    """What `python -m verl.trainer.main_ppo OVERRIDES` hands its TaskRunner: @hydra.main(config_path=
    "config", config_name="ppo_trainer") next to verl/trainer/main_ppo.py, then resolved."""
    main_ppo = importlib.util.find_spec("verl.trainer.main_ppo").origin
    with initialize_config_dir(config_dir=str(Path(main_ppo).parent / "config"), version_base=None):
        config = compose(config_name="ppo_trainer", overrides=overrides)
    OmegaConf.resolve(config)  # TaskRunnerV1.run
    legacy = OmegaConf.to_container(config.custom_reward_function)
    if migrate:
        config = migrate_legacy_reward_impl(config)
    return config, legacy


def data_proto(tok, data_source: str) -> DataProto:
    """One row per problem, laid out as verl lays out a batch: prompts left-padded, responses
    right-padded, attention_mask over both; the row's dataset fields as non-tensor arrays."""
    rows, prompts, responses = [], [], []
    for i, (question, solution, answer) in enumerate(tiny.PROBLEMS):
        chat = [{"role": "user", "content": question}]
        prompts.append(tok.apply_chat_template(chat, tokenize=True, add_generation_prompt=True, return_dict=False))
        responses.append(tok(solution + tok.eos_token, add_special_tokens=False)["input_ids"])
        rows.append({"data_source": data_source, "raw_prompt": chat, "index": i,
                     "reward_model": {"style": "rule", "ground_truth": answer},
                     "extra_info": {"split": "train", "index": i, "question": question, "answer": solution}})
    p_len, r_len, pad = max(map(len, prompts)), max(map(len, responses)), tok.pad_token_id
    p_ids = torch.tensor([[pad] * (p_len - len(p)) + p for p in prompts])
    r_ids = torch.tensor([r + [pad] * (r_len - len(r)) for r in responses])
    mask = torch.tensor([[0] * (p_len - len(p)) + [1] * (len(p) + len(r)) + [0] * (r_len - len(r))
                         for p, r in zip(prompts, responses)])
    batch = TensorDict({"prompts": p_ids, "responses": r_ids, "input_ids": torch.cat([p_ids, r_ids], 1),
                        "attention_mask": mask, "position_ids": (mask.cumsum(1) - 1).clamp(min=0)},
                       batch_size=len(rows))
    non_tensor = {key: np.array([row[key] for row in rows], dtype=object) for key in rows[0]}
    n = len(rows)
    non_tensor.update({"__num_turns__": np.array([2] * n), "tool_extra_fields": np.array([{} for _ in rows], dtype=object),
                       "prompt_len": np.array(list(map(len, prompts))), "response_len": np.array(list(map(len, responses)))})
    return DataProto(batch=batch, non_tensor_batch=non_tensor)


def plain(value):
    """JSON-able: numpy scalars and arrays to Python."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


async def run_case(tokenizer_dir: str, overrides: list[str], migrate: bool, data_source: str) -> dict:
    config, legacy = verl_config([f"actor_rollout_ref.model.path={tokenizer_dir}", *overrides], migrate)
    worker = RewardLoopWorker(config)  # built inside the running loop, as in a Ray async actor
    fn = worker.reward_manager.compute_score
    while hasattr(fn, "func"):  # functools.partial(_call_with_kwargs_async, raw_fn, ...)
        fn = fn.args[0] if fn.func.__name__.startswith("_call_with_kwargs") else fn.func
    try:
        outputs, error = plain(await worker.compute_score_batch(data_proto(tiny.tokenizer(), data_source))), None
    except Exception as err:  # what verl raises is part of the answer (an unknown data source, say)
        outputs, error = None, f"{type(err).__name__}: {err}"
    return {"reward_fn_config": OmegaConf.to_container(config.reward.custom_reward_function),
            "legacy_fn_config": legacy, "compute_score": f"{fn.__module__}.{fn.__qualname__}",
            "compute_score_file": fn.__code__.co_filename,
            "reward_manager": type(worker.reward_manager).__name__, "outputs": outputs, "error": error}


async def run(tokenizer_dir: str, cases: list[dict]) -> dict:
    tiny.tokenizer().save_pretrained(tokenizer_dir)  # verl loads it from actor_rollout_ref.model.path
    return {case["name"]: await run_case(tokenizer_dir, case["overrides"], case.get("migrate", False),
                                         case.get("data_source", DATA_SOURCE))
            for case in cases}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("tokenizer_dir")
    parser.add_argument("cases", type=json.loads,
                        help='[{"name", "overrides": [KEY=VALUE, ...], "migrate": bool, "data_source": str}]')
    opts = parser.parse_args()
    tiny.result(cases=asyncio.run(run(opts.tokenizer_dir, opts.cases)))


if __name__ == "__main__":
    main()
