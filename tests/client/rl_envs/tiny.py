"""Shared by the run_*.py scripts, inside a framework's virtualenv: a real tokenizer and a tiny
causal LM built in code (nothing is fetched), and the JSON result line the tests read."""

from __future__ import annotations

import json
import os
import sys

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

# Math prompts with multi-step answers: the daemon scores each blank-line-separated step.
PROBLEMS = [
    ("What is 2+3*4?", "3*4 = 12.\n\n2 + 12 = 14.\n\nThe answer is \\boxed{14}.", "14"),
    ("What is (5+1)*2?", "5 + 1 = 6.\n\n6 * 2 = 12.\n\nThe answer is \\boxed{12}.", "12"),
    ("What is 9-4+7?", "9 - 4 = 5.\n\n5 + 7 = 12.\n\nThe answer is \\boxed{12}.", "12"),
    ("What is 8/2+3?", "8 / 2 = 4.\n\n4 + 3 = 7.\n\nThe answer is \\boxed{7}.", "7"),
]

RESULT_PREFIX = "RESULT "


def tokenizer():
    """A byte-level BPE tokenizer with no merges (256 byte tokens) and ChatML specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    raw = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    raw.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<|pad|>", additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    tok.chat_template = CHATML
    return tok


def causal_lm(tok, seed: int = 0):
    """A 2-layer Llama with random weights over `tok`'s vocabulary."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    return LlamaForCausalLM(config)


def result(**fields) -> None:
    """The one line the test reads (stdout, flushed; everything else may be noise)."""
    sys.stdout.write(RESULT_PREFIX + json.dumps(fields) + "\n")
    sys.stdout.flush()


def offline() -> None:
    """Nothing reaches a hub from these scripts."""
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(key, "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
