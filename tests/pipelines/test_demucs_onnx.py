"""Demucs on ONNX Runtime against demucs itself, and the fallbacks to torch, on small random models."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("demucs")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

import soundfile as sf  # noqa: E402

from pipelines.engine import Engine  # noqa: E402
from pipelines.errors import ChainError  # noqa: E402
from pipelines.families import backend_choice, demucs_onnx  # noqa: E402
from pipelines.modelstore import ModelStore  # noqa: E402
from tools.random_models import install_random_demucs  # noqa: E402
from tools.reference import demucs_reference  # noqa: E402

SR = 44100
TOLERANCE = 1e-4  # max abs difference from demucs's apply_model (the promise on full-size models is 1e-3)
ROOT = Path(__file__).resolve().parents[2]
# share_derived=False throughout: these tests are about building the derived files, so each store builds its own


@pytest.fixture(scope="module")
def mix() -> np.ndarray:
    """3.5 s of stereo noise: three of the small models' 2 s segments (1.5 s apart), the last one short."""
    return (0.1 * np.random.default_rng(1).standard_normal((2, int(3.5 * SR)))).astype(np.float32)


def derived(store: ModelStore) -> list[Path]:
    return sorted((store.root / demucs_onnx.DERIVED).glob("*.onnx"))


def max_difference(ours: dict, theirs: dict) -> float:
    assert sorted(ours) == sorted(theirs)
    return max(float(np.abs(ours[s] - theirs[s]).max()) for s in ours)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> ModelStore:
    store = ModelStore(tmp_path_factory.mktemp("store"))
    install_random_demucs(store, "htdemucs", seed=5, share_derived=False)
    return store


def test_stems_split_runs_onnxruntime_and_matches_demucs(store, mix, tmp_path):
    """The user's path: `stems split` in a fresh process builds the file once, and its stems are demucs's."""
    src = tmp_path / "mix.wav"
    sf.write(src, mix.T, SR, subtype="FLOAT")
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "stems.cli",
        "split",
        str(src),
        "--preset",
        "4_tracks",
        "--out",
        str(out),
        "--model-dir",
        str(store.root),
        "--bit-depth",
        "32",
    ]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr
    (onnx_file,) = derived(store)
    meta = json.loads(onnx_file.with_suffix(".json").read_text())
    assert meta["check_max_abs_difference"] <= TOLERANCE and meta["length"] == 2 * SR
    stems = {p.stem: sf.read(p, dtype="float32")[0].T for p in out.glob("*.wav")}
    assert max_difference(stems, demucs_reference(store, "htdemucs", mix, tmp_path)) <= TOLERANCE
    built = onnx_file.stat().st_mtime_ns
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)  # a second process reuses it
    assert r.returncode == 0, r.stderr
    assert derived(store) == [onnx_file] and onnx_file.stat().st_mtime_ns == built


def test_engine_uses_onnxruntime_for_a_bag(mix, tmp_path):
    store = ModelStore(tmp_path / "store")
    install_random_demucs(store, "htdemucs_ft", params={"segment": 1.5, "backend": "onnxruntime"}, share_derived=False)
    engine = Engine(store)
    ours = engine.run_model("htdemucs_ft", mix, SR)
    sep = engine.separator("htdemucs_ft")
    assert sep.backend == "onnxruntime" and len(sep._runners) == 4 and len(derived(store)) == 4
    assert max_difference(ours, demucs_reference(store, "htdemucs_ft", mix, tmp_path, segment=1.5)) <= TOLERANCE


def test_torch_backend_param_builds_nothing(mix, tmp_path):
    store = ModelStore(tmp_path / "store")
    install_random_demucs(store, "htdemucs", seed=5, params={"backend": "torch"}, share_derived=False)
    ours = Engine(store).run_model("htdemucs", mix, SR)
    assert derived(store) == []
    assert max_difference(ours, demucs_reference(store, "htdemucs", mix, tmp_path)) <= TOLERANCE


def test_without_onnxruntime_auto_runs_torch_and_says_why(store, mix, tmp_path):
    """A fresh process where onnxruntime cannot be imported: same stems from torch, the reason recorded."""
    code = (
        "import sys, json, numpy as np; sys.modules['onnxruntime'] = None\n"
        "from pipelines.engine import Engine; from pipelines.modelstore import ModelStore\n"
        f"e = Engine(ModelStore({str(store.root)!r})); mix = np.load({str(tmp_path / 'mix.npy')!r})\n"
        "out = e.run_model('htdemucs', mix, 44100); s = e.separator('htdemucs')\n"
        f"np.savez({str(tmp_path / 'out.npz')!r}, **out)\n"
        "print(json.dumps([s.backend, s.backend_reason]))\n"
    )
    np.save(tmp_path / "mix.npy", mix)
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr
    backend, reason = json.loads(r.stdout.strip().splitlines()[-1])
    assert backend == "torch" and "onnxruntime" in reason
    ours = dict(np.load(tmp_path / "out.npz"))
    assert max_difference(ours, demucs_reference(store, "htdemucs", mix, tmp_path)) <= TOLERANCE


def test_unwritable_store_falls_back_or_fails_when_asked(mix, tmp_path):
    """Where the derived file cannot be written, auto runs torch (same stems); an explicit onnxruntime fails at load."""
    store = ModelStore(tmp_path / "store")
    install_random_demucs(store, "htdemucs", seed=5, share_derived=False)
    (store.root / "derived").write_text("a file where the directory should be")
    engine = Engine(store)
    ours = engine.run_model("htdemucs", mix, SR)
    sep = engine.separator("htdemucs")
    assert sep.backend == "torch" and "derived" in sep.backend_reason
    assert max_difference(ours, demucs_reference(store, "htdemucs", mix, tmp_path)) <= TOLERANCE
    explicit = ModelStore(tmp_path / "explicit")
    install_random_demucs(explicit, "htdemucs", params={"backend": "onnxruntime"}, share_derived=False)
    (explicit.root / "derived").write_text("")
    with pytest.raises(ChainError, match="onnxruntime"):
        Engine(explicit).separator("htdemucs")


def test_mixed_precision_keeps_torch(tmp_path):
    store = ModelStore(tmp_path / "store")
    install_random_demucs(store, "htdemucs", params={"precision": "bfloat16"}, share_derived=False)
    sep = Engine(store).separator("htdemucs")
    assert sep.backend == "torch" and "bfloat16" in sep.backend_reason and derived(store) == []


def test_a_corrupt_derived_file_is_rebuilt(mix, tmp_path):
    store = ModelStore(tmp_path / "store")
    install_random_demucs(store, "htdemucs", seed=5, params={"backend": "onnxruntime"}, share_derived=False)
    Engine(store).separator("htdemucs")
    (onnx_file,) = derived(store)
    with open(onnx_file, "r+b") as f:  # same size, other bytes: only the sha256 pin can tell
        f.seek(onnx_file.stat().st_size // 2)
        f.write(b"\x13\x37\x13\x37")
    engine = Engine(store)
    ours = engine.run_model("htdemucs", mix, SR)
    assert engine.separator("htdemucs").backend == "onnxruntime"
    meta = json.loads(onnx_file.with_suffix(".json").read_text())
    assert meta["onnx_sha256"] == demucs_onnx.sha256_file(onnx_file)
    assert max_difference(ours, demucs_reference(store, "htdemucs", mix, tmp_path)) <= TOLERANCE


def test_hdemucs_runs_onnxruntime_when_asked(mix, tmp_path):
    """hdemucs_mmi (LSTMs and local attention in its DConv) exports too; auto keeps it on torch."""
    store = ModelStore(tmp_path / "store")
    install_random_demucs(store, "hdemucs_mmi", params={"segment": 2.0, "backend": "onnxruntime"}, share_derived=False)
    engine = Engine(store)
    ours = engine.run_model("hdemucs_mmi", mix, SR)
    sep = engine.separator("hdemucs_mmi")
    assert sep.backend == "onnxruntime" and len(derived(store)) == 1
    # 2 s segments: the first two run in ONNX Runtime, the short last one in torch
    assert max_difference(ours, demucs_reference(store, "hdemucs_mmi", mix, tmp_path, segment=2.0)) <= 1e-3
    auto = ModelStore(tmp_path / "auto")
    install_random_demucs(auto, "hdemucs_mmi", params={"segment": 2.0}, share_derived=False)
    sep = Engine(auto).separator("hdemucs_mmi")
    assert sep.backend == "torch" and "HDemucs" in sep.backend_reason and derived(auto) == []


def test_models_install_builds_the_derived_file(tmp_path):
    from tools.random_models import make_random_demucs

    (weights,) = make_random_demucs("htdemucs", tmp_path / "made", seed=7)
    store = tmp_path / "store"
    r = subprocess.run(
        [sys.executable, "-m", "stems.cli", "models", "install", "htdemucs", str(weights), "--model-dir", str(store)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert r.returncode == 0, r.stderr
    # both backends were timed on this CPU (the graph is built to be timed) and the faster one is kept
    assert "htdemucs loads and runs on " in r.stderr and "measured on this CPU" in r.stderr
    assert json.loads(r.stdout)["htdemucs"]["family"] == "demucs"
    assert len(derived(ModelStore(store))) == 1
    assert len(list((store / backend_choice.DIRECTORY).glob("htdemucs-*.json"))) == 1
