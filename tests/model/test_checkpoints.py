"""Versioned checkpoints: bit-exact round trips, atomic writes, checksums, rollback, reload."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from actprm.model.build import load_prm, publish_initial
from actprm.model.training.checkpoints import INDEX, MANIFEST, POINTER, PRUNED, WEIGHTS, CheckpointError, CheckpointStore
from actprm.model.training.trainer import LabelledSample, Trainer, TrainerConfig, trainable_state
from support.model import tiny_prm, torch_one_thread  # noqa: F401  (autouse fixture)

SAMPLES = [
    LabelledSample("l1", "p1", ["s0 ok", "s1 bad"], 1),
    LabelledSample("l2", "p2", ["s0 ok", "s1 ok"], -1),
    LabelledSample("l3", "p3", ["s0 bad", "s1 ok"], 0),
]
PROBE = [("probe problem", ["s0 ok", "s1 bad", "s2 ok"]), ("other", ["x"])]


def _tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "heads.w1": torch.randn(4, 8, 3, generator=g),
        "heads.b1": torch.randn(4, 1, 3, generator=g).to(torch.bfloat16),
        "body.embed": torch.randn(5, 2, generator=g).to(torch.float16),
        "body.count": torch.randint(0, 1000, (7,), generator=g),
        "scalar": torch.tensor(3.5),
        "view": torch.randn(6, 4, generator=g).t(),  # non-contiguous input
    }


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


def test_round_trip_is_bit_exact_and_versions_grow(tmp_path):
    store = CheckpointStore(tmp_path / "ckpt")  # created on first save
    assert store.versions() == [] and store.latest() is None
    saved = [_tensors(i) for i in range(3)]
    versions = [store.save(t, {"kind": "update"}).version for t in saved]
    assert versions == [0, 1, 2]
    assert store.versions() == [0, 1, 2] and store.latest() == 2
    for v, t in enumerate(saved):
        manifest, loaded = store.load(v)
        assert manifest.version == v
        _assert_same(t, loaded)
    # default = latest
    assert store.load()[0].version == 2


def test_manifest_fields(tmp_path):
    store = CheckpointStore(tmp_path)
    m0 = store.save(_tensors(0), {"kind": "init", "parent": None, "mode": "heads"})
    m1 = store.save(_tensors(1), {"kind": "update", "consumed_label_ids": ["a", "b"], "metrics": {"loss": 0.5}})
    assert (m0.version, m0.parent, m0.kind) == (0, None, "init")
    # No parent given for an update: it is the previous latest version.
    assert (m1.version, m1.parent, m1.kind) == (1, 0, "update")
    on_disk = json.loads((tmp_path / "v000001" / MANIFEST).read_text())
    assert on_disk["consumed_label_ids"] == ["a", "b"]
    assert on_disk["parent"] == 0 and on_disk["kind"] == "update" and on_disk["rolled_back_from"] is None
    assert on_disk["metrics"] == {"loss": 0.5}
    # sha256 is the real digest of the weights file.
    digest = hashlib.sha256((tmp_path / "v000001" / WEIGHTS).read_bytes()).hexdigest()
    assert on_disk["sha256"] == digest == m1.sha256
    assert store.manifest(1) == m1


def test_rollback_is_a_new_version_with_the_old_weights(tmp_path):
    store = CheckpointStore(tmp_path)
    a, b = _tensors(0), _tensors(1)
    store.save(a, {"kind": "init", "parent": None, "consumed_label_ids": []})
    store.save(b, {"kind": "update", "consumed_label_ids": ["x"]})
    m = store.rollback(0)
    # Versions only grow: the rollback is v2, not a rewrite of v1 or v0.
    assert m.version == 2 and store.versions() == [0, 1, 2]
    assert (m.kind, m.parent, m.rolled_back_from) == ("rollback", 0, 0)
    assert m.consumed_label_ids == []  # nothing new was trained on
    _assert_same(a, store.load(2)[1])
    _assert_same(b, store.load(1)[1])  # history untouched
    assert store.manifest(2).rolled_back_from == 0


def test_prune_keeps_v0_the_newest_weights_and_every_manifest(tmp_path):
    store = CheckpointStore(tmp_path)
    store.save(_tensors(0), {"kind": "init", "parent": None, "consumed_label_ids": []})
    for v in range(1, 7):
        store.save(_tensors(v), {"kind": "update", "consumed_label_ids": [f"l{v}"]})
    assert store.prune(2) == [1, 2, 3, 4]
    assert store.prune(2) == []  # idempotent
    assert store.versions() == [0, 1, 2, 3, 4, 5, 6]  # the history stays
    assert store.versions(with_weights=True) == [0, 5, 6]
    # Pruned versions leave no directory: their manifests are compacted into the index, which
    # keeps what each consumed.
    assert sorted(p.name for p in tmp_path.glob("v*")) == ["v000000", "v000005", "v000006"]
    assert [l for v in store.versions() for l in store.manifest(v).consumed_label_ids] == [f"l{v}" for v in range(1, 7)]
    assert [store.manifest(v).n_consumed for v in range(1, 5)] == [1, 1, 1, 1]
    assert store.manifest(6).consumed_label_ids == ["l6"] and store.manifest(3).parent == 2
    assert store.has(3) and not store.has(9)
    _assert_same(_tensors(0), store.load(0)[1])
    _assert_same(_tensors(6), store.load()[1])
    with pytest.raises(CheckpointError, match=r"version 3's weights were pruned .*\[0, 5, 6\]"):
        store.load(3)
    with pytest.raises(CheckpointError, match="pruned"):
        store.rollback(2)  # nothing is published from weights that are gone
    assert store.latest() == 6
    store.save(_tensors(7), {"kind": "update", "consumed_label_ids": ["l7"]})
    assert store.prune(2) == [5] and store.versions(with_weights=True) == [0, 6, 7]
    assert store.prune(0) == []  # 0 keeps everything


def test_altered_weights_fail_the_checksum(tmp_path):
    store = CheckpointStore(tmp_path)
    store.save(_tensors(0), {})
    weights = tmp_path / "v000000" / WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # one bit of the last tensor's data; the file still parses
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum"):
        store.load(0)


def test_missing_version_and_bad_manifest_are_checkpoint_errors(tmp_path):
    store = CheckpointStore(tmp_path)
    with pytest.raises(CheckpointError):
        store.load()  # nothing saved yet
    store.save(_tensors(0), {})
    with pytest.raises(CheckpointError):
        store.load(5)
    (tmp_path / "v000000" / MANIFEST).write_text("{not json")
    with pytest.raises(CheckpointError) as info:
        store.load(0)
    assert "\n" not in str(info.value)


@contextmanager
def _writer_inside_save(script: str, store_dir: Path):
    """A process running `script` on the store, yielded once it is inside save() (its temporary
    directory exists); killed on the way out if it is still running."""
    proc = subprocess.Popen([sys.executable, "-c", script, str(store_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not list(store_dir.glob(".tmp-*")):
            assert proc.poll() is None, f"writer exited early: {proc.communicate()}"
            assert time.monotonic() < deadline, "writer never started writing"
            time.sleep(0.001)
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


_KILLED_WRITER = textwrap.dedent(
    """
    import sys, torch
    from actprm.model.training.checkpoints import CheckpointStore
    big = torch.ones(50 * 1024 * 1024)  # 200 MB of float32: the write takes a while
    print("ready", flush=True)
    CheckpointStore(sys.argv[1]).save({"heads.big": big}, {"kind": "update"})
    print("finished", flush=True)
    """
)


def test_killed_write_leaves_the_previous_version_intact(tmp_path):
    store = CheckpointStore(tmp_path)
    previous = _tensors(0)
    store.save(previous, {"kind": "init", "parent": None})

    with _writer_inside_save(_KILLED_WRITER, tmp_path) as proc:
        # Killed with no chance to clean up (SIGKILL runs no finally blocks).
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    out = proc.stdout.read()
    assert proc.returncode == -signal.SIGKILL
    assert "finished" not in out, "the write completed before the kill; the test proved nothing"

    # The half-written version is invisible; the previous one is intact and loads.
    assert store.latest() == 0 and store.versions() == [0]
    _assert_same(previous, store.load()[1])
    # The crash left its temporary directory; clean_partial removes it (and only it).
    assert len(list(tmp_path.glob(".tmp-*"))) == 1
    assert store.clean_partial() == 1
    assert list(tmp_path.glob(".tmp-*")) == []
    assert store.versions() == [0]
    # The dead writer's lock is gone with it: the next save gets version 1.
    assert store.save(_tensors(1), {}).version == 1


_LIVE_WRITER = textwrap.dedent(
    """
    import sys, torch
    from actprm.model.training.checkpoints import CheckpointStore, CheckpointError
    big = torch.ones(50 * 1024 * 1024)  # 200 MB: a write long enough to overlap
    try:
        m = CheckpointStore(sys.argv[1]).save({"heads.big": big}, {"kind": "update"})
        print("finished", m.version, flush=True)
    except Exception as err:
        print("failed", type(err).__name__, err, flush=True)
    """
)


def test_clean_partial_leaves_a_live_writer_alone(tmp_path):
    store = CheckpointStore(tmp_path)
    store.save(_tensors(0), {"kind": "init", "parent": None})
    with _writer_inside_save(_LIVE_WRITER, tmp_path) as proc:
        removed = store.clean_partial()  # the writer is alive and inside save()
        out, err = proc.communicate(timeout=120)
    assert removed == 0
    assert out.strip() == "finished 1", (out, err)
    assert store.versions() == [0, 1]


_FILE_TOO_LARGE = textwrap.dedent(
    """
    import resource, signal, sys, torch
    from actprm.model.training.checkpoints import CheckpointStore, CheckpointError
    store = CheckpointStore(sys.argv[1])
    # A real write failure without filling a disk: files may not grow past 1 MiB, and the
    # kernel then fails the write with EFBIG (SIGXFSZ ignored, as a daemon would).
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, hard))
    try:
        store.save({"heads.big": torch.ones(1 << 21)}, {"kind": "update"})  # 8 MiB
        print("saved")
    except CheckpointError as err:
        print("CheckpointError:", err)
    except Exception as err:
        print("other", type(err).__name__, err)
    """
)


def test_write_failure_is_a_checkpoint_error(tmp_path):
    store = CheckpointStore(tmp_path)
    previous = _tensors(0)
    store.save(previous, {"kind": "init", "parent": None})
    run = subprocess.run([sys.executable, "-c", _FILE_TOO_LARGE, str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    # Whatever the error type, the store itself must stay sound.
    assert store.versions() == [0] and list(tmp_path.glob(".tmp-*")) == []
    _assert_same(previous, store.load()[1])
    lines = run.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("CheckpointError:"), (run.stdout, run.stderr)


def test_unwritable_directory_is_a_one_line_checkpoint_error(tmp_path):
    root = tmp_path / "ro"
    root.mkdir()
    root.chmod(0o555)
    try:
        if os.access(root, os.W_OK):
            pytest.skip(reason="running as root: chmod 555 does not stop writes")
        with pytest.raises(CheckpointError) as info:
            CheckpointStore(root).save(_tensors(0), {})
        assert "\n" not in str(info.value) and str(root) in str(info.value)
    finally:
        root.chmod(0o755)


def test_root_under_a_file_is_a_one_line_checkpoint_error(tmp_path):
    # Works even as root (unlike chmod): the store root cannot be created under a file.
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CheckpointError) as info:
        CheckpointStore(blocker / "ckpt").save(_tensors(0), {})
    assert "\n" not in str(info.value) and "cannot write a checkpoint" in str(info.value)


def _save_update(store, prm, cfg, result, ids):
    # The fields the training loop writes for an update (see streams/roles/training.py).
    return store.save(
        trainable_state(prm, cfg.mode),
        {"kind": "update", "mode": cfg.mode, "backbone": prm.backbone.reference(), "prm": asdict(prm.config),
         "settings": cfg.model_dump(mode="json"), "consumed_label_ids": ids, "metrics": {"loss": result.loss}},
    )


@pytest.mark.parametrize("mode", ["heads", "lora"])
def test_load_prm_scores_identically_to_the_saved_prm(tmp_path, mode):
    prm = tiny_prm(4)
    cfg = TrainerConfig(mode=mode, lr=1e-2, warmup_steps=0)
    store = CheckpointStore(tmp_path)
    v0 = publish_initial(store, prm, cfg)
    assert (v0.version, v0.kind) == (0, "init")
    initial_scores = prm.score(PROBE)

    trainer = Trainer(prm, cfg)
    assert trainer.standardise_inputs(SAMPLES)  # as the first fit does: its stats travel too
    result = trainer.update(SAMPLES)
    assert result.applied
    m = _save_update(store, prm, cfg, result, [s.id for s in SAMPLES])
    assert (m.version, m.parent, m.consumed_label_ids) == (1, 0, ["l1", "l2", "l3"])
    expected = prm.score(PROBE)
    assert [s.mu for s in expected] != [s.mu for s in initial_scores]  # the update mattered

    # A fresh process would do exactly this: rebuild from the manifest, load the weights.
    loaded, manifest = load_prm(store)
    assert manifest.version == 1 and manifest.mode == mode
    got = loaded.score(PROBE)
    for e, g in zip(expected, got):
        assert g.mu == e.mu and g.sigma == e.sigma and g.probs == e.probs  # bit-exact
    # The anchors travel with the heads, so the regulariser still pulls to the ORIGINAL init.
    for name, buf in prm.heads.named_buffers():
        assert torch.equal(buf, getattr(loaded.heads, name))

    # Version 0 reloads the untrained heads; a version directory path works too.
    old, _ = load_prm(tmp_path / "v000000")
    assert [s.mu for s in old.score(PROBE)] == [s.mu for s in initial_scores]


def test_a_version_saved_before_input_standardisation_loads_with_raw_inputs(tmp_path):
    prm = tiny_prm(4)
    cfg = TrainerConfig(mode="heads", lr=1e-2, warmup_steps=0)
    store = CheckpointStore(tmp_path)
    publish_initial(store, prm, cfg)
    assert Trainer(prm, cfg).update(SAMPLES).applied  # update, not fit: the heads still read raw states
    old = {k: v for k, v in trainable_state(prm, "heads").items() if not k.startswith("heads.input_")}
    store.save(old, {"kind": "update", "mode": "heads", "backbone": prm.backbone.reference(),
                     "prm": asdict(prm.config), "settings": cfg.model_dump(mode="json"), "consumed_label_ids": ["l1"]})
    loaded, manifest = load_prm(store)
    assert manifest.version == 1 and int(loaded.heads.input_rows) == 0
    assert [s.mu for s in loaded.score(PROBE)] == [s.mu for s in prm.score(PROBE)]


def _synthetic_store(root: Path, n_versions: int, keep: int = 50) -> CheckpointStore:
    """A store as a long run leaves it: `n_versions` versions, all but v0 and the newest `keep`
    compacted into the index, the newest ones as directories (a manifest without weights)."""
    index = root / INDEX
    index.mkdir(parents=True)
    newest = range(n_versions - keep, n_versions)
    for seg in range(0, n_versions - keep, 1000):
        rows = [json.dumps({"version": v, "parent": v - 1, "kind": "update", "n_consumed": 16})
                for v in range(max(seg, 1), min(seg + 1000, n_versions - keep))]
        (index / f"{seg // 1000:06d}.jsonl").write_text("\n".join(rows) + "\n")
    for v in [0, *newest]:
        (root / f"v{v:06d}").mkdir()
        (root / f"v{v:06d}" / MANIFEST).write_text(json.dumps({"version": v, "parent": v - 1 if v else None}))
    return CheckpointStore(root)


def test_latest_reads_the_pointer_not_the_directory(tmp_path, monkeypatch):
    """At 200,000 versions the latest is found without listing anything, in the time of a
    fresh store's; a missing or corrupt pointer is recovered by one listing."""
    fresh = CheckpointStore(tmp_path / "fresh")
    fresh.save(_tensors(0), {"kind": "init"})
    big = _synthetic_store(tmp_path / "big", 200_000)
    assert big.latest() == 199_999  # no pointer yet: recovered by listing, which writes the pointer
    assert json.loads((big.root / POINTER).read_text()) == {"version": 199_999}

    def no_listing(*_a, **_k):
        raise AssertionError("latest() listed a directory")
    monkeypatch.setattr(Path, "iterdir", no_listing)
    monkeypatch.setattr(Path, "glob", no_listing)
    monkeypatch.setattr(os, "scandir", no_listing)
    monkeypatch.setattr(os, "listdir", no_listing)

    def per_call(store: CheckpointStore) -> float:
        t0 = time.perf_counter()
        for _ in range(2000):
            store.latest()
        return (time.perf_counter() - t0) / 2000
    per_call(big)
    assert big.latest() == 199_999 and fresh.latest() == 0
    # Generous bound for a shared CPU: O(1) is a few stats, O(n) was 0.3 s at 40k versions.
    assert per_call(big) < 3 * per_call(fresh) + 2e-4
    assert big.has(150_000) and big.has(199_999) and not big.has(200_000)
    assert big.manifest(123_456).n_consumed == 16  # one index file read, not the whole history


def test_a_stale_corrupt_or_missing_pointer_still_gives_the_latest(tmp_path):
    store = CheckpointStore(tmp_path)
    for v in range(3):
        store.save(_tensors(v), {"kind": "update"})
    pointer = tmp_path / POINTER
    pointer.write_text(json.dumps({"version": 1}))  # a writer killed between its rename and its pointer
    assert store.latest() == 2
    for bad in ("{not json", json.dumps({"version": 99}), ""):
        pointer.write_text(bad)
        assert store.latest() == 2
        assert json.loads(pointer.read_text()) == {"version": 2}  # rewritten by the recovery
    pointer.unlink()
    assert store.latest() == 2 and pointer.exists()
    assert store.save(_tensors(3), {}).version == 3 and json.loads(pointer.read_text()) == {"version": 3}


def test_prune_compacts_an_older_layouts_marked_versions(tmp_path):
    """A store pruned before the index existed (PRUNED markers, manifests in place) is compacted
    by the next prune."""
    store = CheckpointStore(tmp_path)
    for v in range(5):
        store.save(_tensors(v), {"kind": "update", "consumed_label_ids": [f"l{v}", "x"]})
    for v in (1, 2):
        (tmp_path / f"v{v:06d}" / PRUNED).touch()
        (tmp_path / f"v{v:06d}" / WEIGHTS).unlink()
    assert store.prune(2) == []  # v3, v4 are the newest two; v1, v2 were pruned already
    assert store.versions() == [0, 1, 2, 3, 4] and store.versions(with_weights=True) == [0, 3, 4]
    assert not (tmp_path / "v000001").exists() and store.manifest(2).n_consumed == 2
    with pytest.raises(CheckpointError, match="pruned"):
        store.load(1)
