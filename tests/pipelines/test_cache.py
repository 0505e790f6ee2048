"""The step cache: keyed by what decides a step's output, atomic, bounded, and used by the engine."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from pipelines import signals as S
from pipelines.cache import ENGINE_VERSION, StepCache, step_key
from pipelines.engine import Engine
from pipelines.modelstore import ModelStore

SR = 44100


def _signals(seed: int, frames: int = 1000) -> dict[str, S.Signal]:
    rng = np.random.default_rng(seed)
    return {s: S.ArraySignal(rng.standard_normal((2, frames)).astype(np.float32)) for s in ("a", "b")}


def test_round_trip_keeps_samples_peak_and_digest(tmp_path):
    cache = StepCache(tmp_path, 1 << 20)
    outs = _signals(0)
    assert cache.get("k" * 64) is None
    assert cache.put("k" * 64, outs)
    got = cache.get("k" * 64)
    assert sorted(got) == ["a", "b"]
    for s, sig in got.items():
        np.testing.assert_array_equal(sig.to_array(), outs[s].to_array())
        assert sig.peak == pytest.approx(float(np.abs(outs[s].to_array()).max()))
        assert sig.digest == S.content_digest(S.ArraySignal(outs[s].to_array()))
    assert (cache.hits, cache.misses) == (1, 1)


def test_frame_files_enter_by_hard_link(tmp_path):
    w = S.FrameWriter(tmp_path / "x.npy", 2, 500, digest=True)
    w.write(np.ones((2, 500), np.float32))
    f = w.close()
    cache = StepCache(tmp_path / "cache", 1 << 20)
    cache.put("a" * 64, {"s": f})
    (entry,) = [p for _, _, p in cache.entries()]
    assert os.stat(entry / "0.npy").st_ino == os.stat(f.path).st_ino


def test_entries_appear_whole_or_not_at_all(tmp_path):
    cache = StepCache(tmp_path, 1 << 20)
    stale = tmp_path / ".tmp-deadwriter"  # a writer killed mid-put leaves only a temporary directory
    stale.mkdir()
    (stale / "0.npy").write_bytes(b"partial")
    assert cache.entries() == []
    old = time.time() - 7200
    os.utime(stale, (old, old))
    cache.put("b" * 64, _signals(1))
    assert not stale.exists()  # swept once it is clearly abandoned
    # a second writer of the same key finds it stored and keeps the first
    assert cache.put("b" * 64, _signals(2))
    np.testing.assert_array_equal(cache.get("b" * 64)["a"].to_array(), _signals(1)["a"].to_array())


def test_size_bound_evicts_least_recently_used(tmp_path):
    one = 2 * 2 * 1000 * 4  # two sources, stereo, 1000 frames of float32
    cache = StepCache(tmp_path, int(2.5 * (one + 256)))
    for i, key in enumerate(("1" * 64, "2" * 64)):
        cache.put(key, _signals(i))
        past = time.time() - 100 + i
        os.utime(tmp_path / key[:2] / key / "meta.json", (past, past))
    held = cache.get("1" * 64)  # now the most recently used; its files stay open
    cache.put("3" * 64, _signals(3))
    assert cache.get("2" * 64) is None  # the least recently used went
    assert cache.get("1" * 64) is not None and cache.get("3" * 64) is not None
    assert cache.size() <= cache.max_bytes
    cache.evict(0)
    assert cache.entries() == []
    np.testing.assert_array_equal(held["a"].to_array(), _signals(0)["a"].to_array())  # open files outlive eviction


def test_entry_larger_than_the_bound_is_not_stored(tmp_path):
    cache = StepCache(tmp_path, 100)
    assert not cache.put("c" * 64, _signals(0))
    assert cache.entries() == []


def test_key_covers_input_model_params_weights_and_engine():
    base = dict(
        model_id="m",
        input_digest="d",
        sample_rate=SR,
        channels=2,
        frames=10,
        identity={"params": {"overlap": 0.25}, "weights": {"f.th": "aa"}},
    )
    key = step_key(**base)
    assert key == step_key(**base)
    for change in (
        {"model_id": "n"},
        {"input_digest": "e"},
        {"sample_rate": 48000},
        {"frames": 11},
        {"identity": {"params": {"overlap": 0.5}, "weights": {"f.th": "aa"}}},
        {"identity": {"params": {"overlap": 0.25}, "weights": {"f.th": "bb"}}},
    ):
        assert step_key(**{**base, **change}) != key, change
    assert ENGINE_VERSION


def test_engine_runs_a_shared_step_once(tmp_path):
    pytest.importorskip("demucs")
    torch = pytest.importorskip("torch")
    from tools.random_models import install_random_demucs

    torch.set_num_threads(1)
    store = ModelStore(tmp_path / "store")
    install_random_demucs(store, "htdemucs")
    mix = (0.1 * np.random.default_rng(5).standard_normal((2, 3 * SR))).astype(np.float32)
    plain = Engine(store).run("4_tracks", mix, SR)
    engine = Engine(store, cache=StepCache(tmp_path / "cache", 1 << 30))
    results = {p: engine.run(p, mix, SR) for p in ("2_tracks", "acapella", "instrumental", "4_tracks")}
    assert (engine.cache.misses, engine.cache.hits) == (1, 3)
    for stem, y in results["4_tracks"].stems.items():
        np.testing.assert_array_equal(y, plain.stems[stem])
    np.testing.assert_array_equal(results["acapella"].stems["vocals"], plain.stems["vocals"])
    # other params are another key: the same audio runs again
    install_random_demucs(store, "htdemucs", params={"overlap": 0.5})
    Engine(store, cache=engine.cache).run("4_tracks", mix, SR)
    assert engine.cache.misses == 2


def test_file_entries_are_linked_out_and_survive_eviction(tmp_path):
    src = tmp_path / "job"
    src.mkdir()
    (src / "a.wav").write_bytes(b"RIFF" + b"\1" * 100)
    (src / "a.m4a").write_bytes(b"\2" * 50)
    cache = StepCache(tmp_path / "cache", 1 << 20)
    assert cache.get_files("f" * 64, tmp_path / "out0") is None
    assert cache.put_files("f" * 64, {"wav": src / "a.wav", "hq": src / "a.m4a"})
    got = cache.get_files("f" * 64, tmp_path / "out1")
    assert got["wav"].read_bytes() == (src / "a.wav").read_bytes() and got["hq"].suffix == ".m4a"
    cache.evict(0)
    assert cache.get_files("f" * 64, tmp_path / "out2") is None
    assert got["wav"].read_bytes() == (src / "a.wav").read_bytes()  # the job's links outlive the entry
    assert (cache.file_hits, cache.file_misses) == (1, 2)


def test_a_cpu_family_s_cached_step_never_imports_torch(tmp_path):
    """A `cpu` worker's engine ("auto" device, a step cache) runs a DSP preset without importing torch: its device
    is resolved only for a family that runs on one, so no job of such a worker imports torch inside its time limit."""
    import subprocess
    import sys

    code = (
        "import sys, numpy as np; from pipelines.cache import StepCache; from pipelines.engine import Engine; "
        "from pipelines.modelstore import ModelStore; "
        f"e = Engine(ModelStore({str(tmp_path / 'm')!r}), device='auto', cache=StepCache({str(tmp_path / 'c')!r}, 1 << 30)); "
        "mix = 0.1 * np.random.default_rng(0).standard_normal((2, 44100)).astype(np.float32); "
        "r = e.run('phantom_center', mix, 44100); print(sorted(r.stems), 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-1] == "False", out.stdout
