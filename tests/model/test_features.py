"""The on-disk feature cache: hits, misses, what it stores, and invalidation on a new backbone."""

from __future__ import annotations

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from actprm.model.backbone import load_backbone
from actprm.model.features import FeatureCache, backbone_fingerprint, tensor_digest
from actprm.model.prm import EnsemblePRM, PRMConfig
from actprm.model.data.synthetic import marker_trajectories
from tests.support.model import torch_one_thread  # noqa: F401 - autouse fixture

ITEMS = [(r.problem, r.steps) for r in marker_trajectories(6, seed=0)]


def _prm(seed: int = 0, hidden_layer: int | None = None, **cfg) -> EnsemblePRM:
    return EnsemblePRM(load_backbone("tiny", seed=seed, hidden_layer=hidden_layer), PRMConfig(n_heads=4, **cfg))


def test_miss_then_hit_and_same_tensors(tmp_path):
    prm = _prm()
    cache = FeatureCache(prm, tmp_path)
    first = cache.get(ITEMS)
    assert (cache.hits, cache.misses) == (0, 6)
    again = FeatureCache(prm, tmp_path)  # a new process would do the same: nothing in memory
    second = again.get(ITEMS)
    assert (again.hits, again.misses) == (6, 0)
    for a, b in zip(first, second):
        assert torch.equal(a.at_steps, b.at_steps) and a.n_steps == b.n_steps and a.n_tokens == b.n_tokens
    # One new text: one miss, the rest hit.
    again.get(ITEMS[:2] + [("another problem", ["step 0 ok", "step 1 bad"])])
    assert (again.hits, again.misses) == (8, 1)


def test_cached_features_score_like_the_backbone(tmp_path):
    prm = _prm()
    feats = FeatureCache(prm, tmp_path).get(ITEMS)
    for (problem, steps), f in zip(ITEMS, feats):
        assert f.at_steps.shape == (len(steps), prm.backbone.hidden_size)
    direct = prm.score(ITEMS)
    cached = prm.score_features([f.at_steps for f in feats])
    for d, c in zip(direct, cached):
        assert torch.allclose(torch.tensor(d.mu), torch.tensor(c.mu), atol=1e-5)
        assert d.first_error == c.first_error


def test_files_are_safetensors_with_metadata(tmp_path):
    prm = _prm()
    cache = FeatureCache(prm, tmp_path)
    cache.get(ITEMS[:1])
    files = sorted(p.name for p in cache.directory.iterdir())
    assert files == sorted(["cache.json", cache.path_for(*ITEMS[0]).name])
    with safe_open(str(cache.path_for(*ITEMS[0])), framework="pt") as f:
        assert f.metadata()["key"] == cache.key and list(f.keys()) == ["at_steps"]


def test_truncation_is_kept(tmp_path):
    prm = _prm(max_length=140)  # byte tokens: the prompt takes ~100, each step ~11
    problem, steps = "p", [f"step {j} ok" for j in range(6)]
    (f,) = FeatureCache(prm, tmp_path).get([(problem, steps)])
    (again,) = FeatureCache(prm, tmp_path).get([(problem, steps)])
    assert f.truncated and again.truncated and f.n_steps == again.n_steps == 6
    assert 0 < again.at_steps.shape[0] < 6


def test_a_changed_backbone_never_reads_old_features(tmp_path):
    base = FeatureCache(_prm(), tmp_path)
    base.get(ITEMS)
    for other in (_prm(seed=1), _prm(hidden_layer=1), _prm(max_length=1024)):
        cache = FeatureCache(other, tmp_path)
        assert cache.key != base.key and cache.directory != base.directory
        cache.get(ITEMS[:2])
        assert (cache.hits, cache.misses) == (0, 2)
    # Same spec and seed, weights edited in place (a model directory retrained under the same
    # path looks like this): the fingerprint, and so the key, changes.
    edited = _prm()
    before = backbone_fingerprint(edited)
    with torch.no_grad():
        next(edited.body.parameters()).add_(1e-3)
    assert backbone_fingerprint(edited) != before
    cache = FeatureCache(edited, tmp_path)
    assert cache.key != base.key
    cache.get(ITEMS[:1])
    assert cache.misses == 1


def test_the_digest_of_a_tensor_is_the_same_on_any_number_of_threads_and_sees_one_changed_value():
    # As large as SmolLM2's embedding (28M values), where a float64 sum of squares differed in
    # its last digit between 1 and 2 threads, and so did every cache key.
    t = torch.randn(28_311_552, generator=torch.Generator().manual_seed(0))
    threads = torch.get_num_threads()
    try:
        digests = []
        for n in (1, 2, 4):
            torch.set_num_threads(n)
            digests.append(tensor_digest(t))
    finally:
        torch.set_num_threads(threads)
    assert len(set(digests)) == 1
    t[1_000_003] += 1e-3  # far from the first values the digest also names
    assert tensor_digest(t) != digests[0]
    assert tensor_digest(t.bfloat16()) != tensor_digest(t)  # the dtype is part of it


def test_a_file_with_a_foreign_key_is_recomputed(tmp_path):
    prm = _prm()
    cache = FeatureCache(prm, tmp_path)
    path = cache.path_for(*ITEMS[0])
    save_file({"at_steps": torch.zeros(3, 64)}, str(path), metadata={"key": "someone-else", "n_steps": "3",
                                                                      "truncated": "0", "n_tokens": "1"})
    (f,) = cache.get(ITEMS[:1])
    assert cache.misses == 1 and f.at_steps.abs().sum() > 0
    path.write_bytes(b"not a safetensors file")  # torn write: a miss, not a crash
    cache.get(ITEMS[:1])
    assert cache.misses == 2
