"""Device, dtype and batching paths (issue 14). Everything that does not need CUDA runs here on
the CPU with the tiny backbones; the CUDA checks skip without a device (scripts/gpu-check runs
the GPU side end to end)."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from actprm.daemon.settings import Settings
from actprm.model.backbone import BackboneError, RANDOM_ARCHS, load_backbone, resolve_attn, resolve_device, resolve_dtype
from actprm.model.lab.heads_bench import device_peak, forward_flops
from actprm.model.build import build_prm
from actprm.model.judges.base import JudgeError
from actprm.model.judges.clients import make_judge
from actprm.model.prm import PRMConfig
from actprm.model.steps import padding_stats, plan_batches
from actprm.streams.tools.produce import synthetic_trajectories

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a host without CUDA")

# fp32 vs bf16 backbone, heads in fp32: bf16 keeps ~3 significant digits of the hidden states,
# so per-step probabilities move by well under 1e-2 (measured on tiny: 1.3e-4).
SCORE_TOL = 1e-2


def _items(n=12, seed=0):
    return [(t.problem, t.steps) for t in synthetic_trajectories(n, seed=seed)]


def _max_diff(a, b, field):
    return max(abs(x - y) for s, t in zip(a, b) for x, y in zip(getattr(s, field), getattr(t, field)))


# --- resolving settings -----------------------------------------------------------------------

def test_auto_is_cpu_float32_sdpa_without_cuda():
    dev = resolve_device("auto")
    assert dev.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda", 0)) == torch.bfloat16  # no CUDA call: a pure rule
    assert resolve_attn("auto", torch.device("cpu"), torch.float32) == "sdpa"
    assert resolve_attn("eager", torch.device("cpu"), torch.float32) == "eager"


@pytest.mark.parametrize("kwargs, words", [
    ({"device": "gpu"}, "unknown device 'gpu'"),
    ({"dtype": "fp8"}, "unknown dtype 'fp8'"),
    ({"attn_implementation": "fast"}, "unknown attn_implementation 'fast'"),
    ({"attn_implementation": "flash_attention_2", "device": "cpu"}, "needs the flash-attn package"),
])
def test_bad_placement_is_a_one_line_backbone_error(kwargs, words):
    with pytest.raises(BackboneError, match=words) as info:
        load_backbone("tiny", **kwargs)
    assert "\n" not in str(info.value)


@cpu_only
@pytest.mark.parametrize("name", ["cuda", "cuda:1"])
def test_cuda_on_a_cpu_host_is_refused(name):
    with pytest.raises(BackboneError, match="this host has no CUDA device") as info:
        load_backbone("tiny", device=name)
    assert "\n" not in str(info.value)


def test_settings_validate_placement_fields():
    s = Settings()
    assert (s.model.device, s.model.dtype, s.model.attn_implementation) == ("auto", "auto", "auto")
    assert s.scorer.max_batch_tokens == 16384 and s.judge.gpu_memory_utilization == 0.9
    Settings(model={"device": "cuda:3", "dtype": "bfloat16", "attn_implementation": "eager"})
    for bad in ({"model": {"device": "gpu"}}, {"model": {"device": "cuda:"}}, {"model": {"dtype": "fp8"}},
                {"scorer": {"max_batch_tokens": 0}}, {"judge": {"gpu_memory_utilization": 0}},
                {"judge": {"device": "cpu"}}):
        with pytest.raises(ValidationError):
            Settings(**bad)
    dumped = Settings().model_dump(mode="json")  # what `actprm config show` prints
    assert {"device", "dtype", "attn_implementation"} <= set(dumped["model"])


# --- backbones built from a config in code ------------------------------------------------------

def test_random_arch_is_deterministic_and_records_where_it_runs():
    a = load_backbone("random:qwen2-tiny", seed=3)
    b = load_backbone("random:qwen2-tiny", seed=3)
    c = load_backbone("random:qwen2-tiny", seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a.model.parameters(), b.model.parameters()))
    assert not all(torch.equal(x, y) for x, y in zip(a.model.parameters(), c.model.parameters()))
    ref = a.reference()
    assert ref["spec"] == "random:qwen2-tiny" and ref["device"] == "cpu" and ref["dtype"] == "float32"
    assert ref["attn_implementation"] == "sdpa"
    assert type(a.model).__name__ == "Qwen2Model"
    # the separator fits the architecture's vocabulary: no resize of a 150k-row embedding
    assert a.sep_token_id < RANDOM_ARCHS["qwen2-tiny"]["vocab_size"]


def test_random_arch_builds_only_the_layers_it_keeps_and_names_the_known_ones():
    b = load_backbone("random:qwen2-tiny", hidden_layer=1, dtype="bfloat16")
    assert b.num_layers == 1 and len(b.model.layers) == 1
    assert next(b.model.parameters()).dtype == torch.bfloat16 and b.reference()["dtype"] == "bfloat16"
    with pytest.raises(BackboneError, match="qwen2-1.5b"):
        load_backbone("random:gpt-9")
    assert {"qwen2-1.5b", "qwen2-7b", "llama-1b"} <= set(RANDOM_ARCHS)


# --- precision ---------------------------------------------------------------------------------

def test_heads_stay_float32_on_a_bf16_backbone_and_scores_agree():
    items = _items()
    fp32 = build_prm("tiny", dtype="float32", prm=PRMConfig(n_heads=8))
    bf16 = build_prm("tiny", dtype="bfloat16", prm=PRMConfig(n_heads=8))
    assert next(bf16.body.parameters()).dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in bf16.heads.parameters())
    assert all(b.dtype == torch.float32 for b in bf16.heads.buffers() if b.is_floating_point())  # anchors too
    a, b = fp32.score(items), bf16.score(items)
    assert _max_diff(a, b, "mu") < SCORE_TOL
    assert _max_diff(a, b, "sigma") < SCORE_TOL
    feats = bf16.score(items[:2], keep_features=True)
    assert feats[0].features.dtype == torch.float32 and feats[0].features.device.type == "cpu"


# --- token-budget batching ---------------------------------------------------------------------

def test_plan_batches_sorts_and_cuts_by_count_and_tokens():
    lengths = [50, 10, 40, 20, 30, 1000]
    assert plan_batches(lengths, max_batch=2) == [[1, 3], [4, 2], [0, 5]]
    # budget 100 padded tokens: 10,20,30 -> 3x30=90 fits; +40 would be 4x40=160
    plan = plan_batches(lengths, max_batch=8, max_tokens=100)
    assert plan == [[1, 3, 4], [2, 0], [5]]  # 1000 alone: over budget, still scored
    assert sorted(i for b in plan for i in b) == list(range(len(lengths)))
    assert plan_batches([], 8, 100) == []
    stats = padding_stats(lengths, plan)
    assert stats["real_tokens"] == 1150 and stats["padded_tokens"] == 90 + 100 + 1000
    assert stats["padding_waste"] == pytest.approx((1190 - 1150) / 1190)


def test_token_budget_changes_batches_not_scores():
    items = _items(10, seed=1)
    wide = build_prm("tiny", prm=PRMConfig(n_heads=4, score_batch_size=8, score_max_tokens=None)).score(items)
    narrow = build_prm("tiny", prm=PRMConfig(n_heads=4, score_batch_size=8, score_max_tokens=300)).score(items)
    assert [s.n_tokens for s in wide] == [s.n_tokens for s in narrow]  # input order kept
    assert _max_diff(wide, narrow, "mu") < 1e-5


# --- benchmarks' arithmetic --------------------------------------------------------------------

def test_device_peak_is_named_and_forward_flops_count_the_model():
    peak, source = device_peak("NVIDIA H100 80GB HBM3")
    assert peak == 989e12 and "H100" in source
    assert device_peak("NVIDIA H100 PCIe")[0] == 756e12
    assert device_peak("Some Future GPU")[0] is None
    assert device_peak("anything", peak_tflops=100)[0] == 100e12
    prm = build_prm("tiny", prm=PRMConfig(n_heads=2))
    n = sum(p.numel() for p in prm.body.parameters()) - prm.body.get_input_embeddings().weight.numel()
    one = forward_flops(prm, [100], steps=0)
    assert one == 2 * n * 100 + 4 * 2 * 64 * 100 * 100  # 2 layers, d = 64
    assert forward_flops(prm, [100, 100], steps=0) == 2 * one


# --- the vLLM judge ----------------------------------------------------------------------------

@cpu_only
def test_vllm_judge_is_refused_on_a_cpu_host_in_one_line():
    with pytest.raises(JudgeError, match="CUDA GPU and this host has none") as info:
        make_judge("vllm", model="Qwen/QwQ-32B", device="cuda", gpu_memory_utilization=0.5)
    assert "\n" not in str(info.value) and not info.value.retryable


# --- manifests and status ----------------------------------------------------------------------

def test_manifest_and_status_show_device_dtype_attn(tmp_path):
    from support.roles import memory_process

    s = Settings(state_dir=tmp_path, model={"backbone": "tiny", "n_heads": 2, "dtype": "bfloat16"})
    rt, _ = memory_process(s, ("scorer", "trainer"))
    try:
        status = rt.status()
        assert (status["device"], status["dtype"], status["attn_implementation"]) == ("cpu", "bfloat16", "sdpa")
        ref = rt.store.manifest(0).backbone
        assert (ref["device"], ref["dtype"], ref["attn_implementation"]) == ("cpu", "bfloat16", "sdpa")
        assert all(p.dtype == torch.float32 for p in rt.scorer.serving.current.prm.heads.parameters())
    finally:
        rt.close()


# --- CUDA --------------------------------------------------------------------------------------

@needs_cuda
def test_cuda_scores_agree_with_cpu():
    items = _items()
    cpu = build_prm("tiny", device="cpu", prm=PRMConfig(n_heads=8)).score(items)
    gpu_prm = build_prm("tiny", device="cuda", prm=PRMConfig(n_heads=8))
    assert gpu_prm.device.type == "cuda" and gpu_prm.heads.w1.device.type == "cuda"
    gpu = gpu_prm.score(items)
    assert _max_diff(cpu, gpu, "mu") < SCORE_TOL and _max_diff(cpu, gpu, "sigma") < SCORE_TOL


@needs_cuda
def test_batch_moves_to_cuda_once():
    prm = build_prm("tiny", device="cuda", prm=PRMConfig(n_heads=2))
    batch = prm.collate([prm.encode(p, s) for p, s in _items(2)])
    on = batch.to(prm.device)
    assert on.input_ids.device.type == "cuda" and on.to(prm.device) is on


# --- training: an out-of-memory update is refused, never a crash ----------------------------

def _oom(module, args, kwargs):
    # What the CUDA caching allocator raises; injected so the path runs on a CPU host.
    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


@pytest.mark.parametrize("mode", ["heads", "full"])
def test_out_of_memory_during_an_update_keeps_serving_and_the_labels_pending(tmp_path, mode):
    from actprm.model.build import publish_initial
    from actprm.model.training.checkpoints import CheckpointStore
    from actprm.model.training.trainer import Trainer, TrainerConfig, trainable_state
    from actprm.streams.state.ledger import PENDING, Ledger
    from actprm.client.messages import Label
    from actprm.streams.roles.training import UpdateLoop
    from support.model import synthetic_samples, tiny_prm

    cfg = TrainerConfig(mode=mode, warmup_steps=0, gradient_checkpointing=mode == "full")
    store = CheckpointStore(tmp_path / "ckpt")
    prm = tiny_prm()
    publish_initial(store, prm, cfg)
    ledger = Ledger(tmp_path / "ledger")
    try:
        loop = UpdateLoop(Trainer(prm, cfg), store, ledger, 4, 60)
        for s in synthetic_samples(4, seed=2):
            loop.receive(Label(id=s.id, first_error=s.first_error, n_steps=len(s.steps), judge="oracle",
                               round_id=0, problem=s.problem, steps=s.steps))
        before = {k: v.clone() for k, v in trainable_state(prm, mode).items()}
        hook = prm.body.register_forward_pre_hook(_oom, with_kwargs=True)
        outcome = loop.update()
        hook.remove()
        assert outcome.manifest is None and store.latest() == 0  # nothing published
        assert outcome.error.startswith("CUDA out of memory during the update (") and "\n" not in outcome.error
        assert "v0 keeps serving" in outcome.error and "micro_batch_size" in outcome.error
        assert len(list(ledger.items(PENDING))) == 4  # tried again later, not retired
        after = trainable_state(prm, mode)
        assert all(torch.equal(before[k], after[k]) for k in before)
        assert all(p.grad is None for p in prm.parameters())  # the failed step's gradients are freed
        # Once memory is back the same labels train.
        assert loop.update().manifest is not None and not list(ledger.items(PENDING))
    finally:
        ledger.close()
