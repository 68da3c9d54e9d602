"""OpenRLHF's own SingleTurnAgentExecutor (openrlhf/utils/agent.py): it tokenizes each prompt,
truncates it from the left when too long, has an engine generate, decodes prompt+response into
the query and fetches the reward from `remote_rm_url`, either over HTTP (`actprm serve`'s
/get_reward) or from a Python file it loads and calls as reward_func(queries, prompts, labels).

Runs inside the trl-openrlhf virtualenv (scripts/rl-envs). The engine stands in for OpenRLHF's
vLLM actor (RolloutRayActor.generate): it really generates, with a tiny causal LM, and answers
in vLLM's RequestOutput shape.

    python run_openrlhf.py REMOTE_RM_URL [REMOTE_RM_URL ...] [--kinds short,long,cut-mid-char]

For each URL and kind of prompt (prompts_of): short, the four problems at once (as OpenRLHF's
rollouts run concurrently); long, one prompt far longer than max_len, which OpenRLHF cuts from
the left before generating; cut-mid-char, a long one cut inside a two-byte character.

Last stdout line: RESULT {"runs": [{"url", "file_mode", "kind", "samples": [{"reward",
"scores", "extra_logs", "query_starts_with_prompt", "prompt_tokens", "kept_prompt_tokens",
...}]}], "max_length": N}.
"""

from __future__ import annotations

import argparse
import asyncio
import threading
from copy import deepcopy
from dataclasses import dataclass
from types import SimpleNamespace

import tiny

tiny.offline()

import torch  # noqa: E402
from openrlhf.utils.agent import SingleTurnAgentExecutor  # noqa: E402

MAX_LENGTH = 256  # OpenRLHF's max_len: prompt + response, in tokens (bytes, with this tokenizer)
MAX_NEW_TOKENS = 32


@dataclass
class SamplingParams:
    """The fields of vLLM's SamplingParams that OpenRLHF sets and the executor reads."""
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int | None = None
    min_tokens: int = 1
    skip_special_tokens: bool = False
    logprobs: int | None = None


class TinyEngine:
    """OpenRLHF's llm_engine contract: `await generate(prompt_token_ids, sampling_params,
    multi_modal_data=None)` -> RequestOutput-like (.outputs[0].token_ids/.text/.finish_reason/.logprobs)."""

    def __init__(self, tok, model):
        self.tok, self.model = tok, model
        self.lock = threading.Lock()
        self.calls: list[dict] = []
        self.seed = 0
        # Never end early on a special token: the response must have text to score.
        self.suppress = [tok.eos_token_id, tok.pad_token_id, tok.bos_token_id]

    def _generate(self, prompt_token_ids: list[int], params: SamplingParams, seed: int):
        with self.lock, torch.no_grad():
            generator_seed = torch.manual_seed(seed)  # noqa: F841  (deterministic sampling per call)
            out = self.model.generate(
                torch.tensor([prompt_token_ids]), attention_mask=torch.ones(1, len(prompt_token_ids), dtype=torch.long),
                max_new_tokens=params.max_tokens, min_new_tokens=params.min_tokens, do_sample=True,
                temperature=params.temperature, top_p=params.top_p, suppress_tokens=self.suppress,
                pad_token_id=self.tok.pad_token_id)
        ids = out[0, len(prompt_token_ids):].tolist()
        text = self.tok.decode(ids, skip_special_tokens=params.skip_special_tokens)
        finish = "length" if len(ids) >= params.max_tokens else "stop"
        return SimpleNamespace(prompt_token_ids=list(prompt_token_ids), outputs=[SimpleNamespace(
            token_ids=ids, text=text, finish_reason=finish, logprobs=None)])

    async def generate(self, prompt_token_ids, sampling_params, multi_modal_data=None):
        self.calls.append({"prompt_tokens": len(prompt_token_ids), "max_tokens": sampling_params.max_tokens})
        self.seed += 1  # a new seed per call, over every run: each run scores texts of its own
        return await asyncio.to_thread(self._generate, prompt_token_ids, deepcopy(sampling_params), self.seed)


def chat(tok, question: str) -> str:
    return tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)


def prompts_of(kind: str, tok) -> list[tuple[str, str]]:
    """(prompt, label) pairs. short: the four problems, whole. long: one prompt far over max_len,
    which OpenRLHF cuts from the left. cut-mid-char: a long one cut inside a two-byte character
    ("×"), as a byte-level BPE cuts one: the query then starts with U+FFFD."""
    if kind == "short":
        return [(chat(tok, q), a) for q, _, a in tiny.PROBLEMS]
    question, _, answer = tiny.PROBLEMS[0]
    if kind == "long":
        return [(chat(tok, "Read all of this first. " + "Some context that does not matter. " * 20 + question), answer)]
    keep = MAX_LENGTH - MAX_NEW_TOKENS
    for pad in range(keep):
        prompt = chat(tok, "Some context first. " * 20 + "Note that 3×4 = 12. " + "x" * pad + " " + question)
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        if tok.decode(ids[-keep:]).startswith("\ufffd"):
            return [(prompt, answer)]
    raise AssertionError("no padding puts the cut inside the character")


async def run(url: str, kind: str, tok, engine: TinyEngine) -> dict:
    executor = SingleTurnAgentExecutor(url)  # a .py path: OpenRLHF loads reward_func from it
    pairs = prompts_of(kind, tok)
    params = SamplingParams(max_tokens=MAX_NEW_TOKENS)
    engine.calls.clear()
    outputs = await asyncio.gather(*[executor.execute(prompt, label, params, MAX_LENGTH, tok, engine)
                                     for prompt, label in pairs])
    samples = []
    for (prompt, _), out, call in zip(pairs, outputs, engine.calls):
        query = tok.decode(out["observation_tokens"], skip_special_tokens=False)
        samples.append({
            "reward": out["reward"], "scores": out["scores"], "extra_logs": out["extra_logs"],
            "truncated": out["truncated"], "query_starts_with_prompt": query.startswith(prompt),
            "query_head": query[:24], "prompt_tokens": len(tok(prompt, add_special_tokens=False)["input_ids"]),
            "kept_prompt_tokens": call["prompt_tokens"],
            "response": tok.decode(out["observation_tokens"][out["action_ranges"][0][0]:]),
        })
    return {"url": url, "file_mode": executor.reward_func is not None, "kind": kind, "samples": samples}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("remote_rm_urls", nargs="+")
    parser.add_argument("--kinds", default="short,long", help="short, long, cut-mid-char (see prompts_of)")
    opts = parser.parse_args()
    tok = tiny.tokenizer()
    engine = TinyEngine(tok, tiny.causal_lm(tok).eval())

    async def every_url():
        return [await run(url, kind, tok, engine) for url in opts.remote_rm_urls for kind in opts.kinds.split(",")]

    tiny.result(runs=asyncio.run(every_url()), max_length=MAX_LENGTH)


if __name__ == "__main__":
    main()
