"""The SAM Audio family against the package's own inference, on a tiny random model installed by `stems models install`.

The reference is mlx-audio alone, in another process: `SAMAudio.from_pretrained` on the
checkpoint, its text encoder fetched by name from an offline Hugging Face cache, its processor
for the span anchors and `SAMAudio.separate` per chunk (see `tools/sam_models.py`).
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("mlx_audio", reason="the `sam` extra (mlx-audio) is not installed")

from pipelines import audio as A, custom, signals as S
from pipelines.engine import Engine
from pipelines.errors import ModelNotInstalled, PresetError
from pipelines.families.sam import chunk_bounds, crossfade, shift_anchors
from pipelines.jobspec import CustomSpec, TimeRange
from pipelines.modelstore import ModelStore
from tools.sam_models import run_reference, write_random_sam

MODEL = "sam-audio-small"
SR = 48000
CHUNK, OVERLAP = 11520, 3840  # 0.24 s chunks overlapping by 0.08 s: a 0.4 s signal has one chunk boundary
PARAMS = {"steps": 2, "method": "midpoint", "chunk_seconds": CHUNK / SR, "overlap_seconds": OVERLAP / SR, "seed": 5}
PROMPT = "  a man speaking "
SPANS = [{"start": 1.1, "end": 1.3}]  # seconds of the source; the selection starts at 1.0 s
ANCHORS = [["+", 0.1, 0.3]]  # the same span in the selection's time base: across the chunk boundary (0.16-0.24 s)


def _stereo(seconds: float, sr: int = SR, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    left = 0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * rng.standard_normal(t.size)
    right = 0.2 * np.sin(2 * np.pi * 330 * t + 1.0) + 0.05 * rng.standard_normal(t.size)
    return np.stack([left, right]).astype(np.float32)


MIX = _stereo(0.4)
MIX_44K = _stereo(0.3, 44100, seed=1)


class Recording(S.Signal):
    """A signal that remembers the longest range read from it (memory follows the chunk)."""

    def __init__(self, audio: np.ndarray) -> None:
        self.inner, self.channels, self.frames, self.longest = S.ArraySignal(audio), audio.shape[0], audio.shape[1], 0

    def read(self, lo: int, hi: int) -> np.ndarray:
        self.longest = max(self.longest, hi - lo)
        return self.inner.read(lo, hi)


def extract(engine, mix: np.ndarray, sr: int, mode: str, spans=(), offset: float = 0.0) -> dict[str, np.ndarray]:
    """The custom preset's SAM path (pipelines.custom, as the worker and the CLI run it) on an array."""
    spec = CustomSpec(prompt=PROMPT, sam_model=MODEL, stereo_mode=mode, spans=[TimeRange(**s) for s in spans])
    out = custom.extract(engine, spec, S.ArraySignal(mix), sr, None, offset, None, lambda: False)
    assert {o.made_by for o in out.values()} == {MODEL}
    return {k: o.signal.to_array() for k, o in out.items()}


@pytest.fixture(scope="module")
def sam(tmp_path_factory):
    """The tiny model installed through the CLI, and the package's own results on every signal the tests run."""
    root = tmp_path_factory.mktemp("sam")
    files = write_random_sam(root / "files", MODEL, seed=1)
    store_dir = root / "store"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "stems.cli",
            "models",
            "install",
            MODEL,
            *map(str, files.values()),
            "--params",
            json.dumps(PARAMS),
            "--model-dir",
            str(store_dir),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    mono_44k = A.resample(MIX_44K.mean(axis=0, keepdims=True), 44100, SR)[0]
    signals = {
        "mix": MIX.mean(axis=0),
        "left": MIX[0],
        "right": MIX[1],
        "mid": (MIX[0] + MIX[1]) / 2,
        "side": (MIX[0] - MIX[1]) / 2,
        "mix_44k": mono_44k,
    }
    jobs = [
        {
            "wav": w.astype(np.float32),
            "prompt": PROMPT.strip(),
            "anchors": ANCHORS,
            "chunk": CHUNK,
            "overlap": OVERLAP,
            "seed": PARAMS["seed"],
            "steps": PARAMS["steps"],
            "method": PARAMS["method"],
        }
        for w in signals.values()
    ]
    ref = dict(zip(signals, run_reference(files, MODEL, root / "reference", jobs)))
    return ModelStore(store_dir), ref, files


@pytest.fixture(scope="module")
def engine(sam):
    return Engine(sam[0])


@pytest.mark.parametrize("mode", ["mono", "left_right", "mid_sides"])
def test_stereo_modes_with_spans_across_a_chunk_boundary_equal_the_package(sam, engine, mode):
    _, ref, _ = sam
    out = extract(engine, MIX, SR, mode, spans=SPANS, offset=1.0)
    for stem in ("target", "residual"):
        r = {k: v[stem] for k, v in ref.items()}
        want = {
            "mono": np.stack([r["mix"], r["mix"]]),
            "left_right": np.stack([r["left"], r["right"]]),
            "mid_sides": np.stack([r["mid"] + r["side"], r["mid"] - r["side"]]),
        }[mode]
        got = out[stem]
        assert got.shape == MIX.shape and got.dtype == np.float32
        assert np.max(np.abs(got - want)) < 1e-4, (mode, stem, np.max(np.abs(got - want)))
        assert np.std(got) > 1e-6  # a random model's output, not silence


def test_the_family_reads_and_yields_a_chunk_at_a_time(sam, engine):
    _, ref, _ = sam
    source = Recording(MIX.mean(axis=0, keepdims=True))
    blocks = list(
        engine.separator(MODEL).extract_stream(source, SR, PROMPT, [tuple(a) for a in ANCHORS], 0, lambda: False)
    )
    assert source.longest <= CHUNK and max(b["target"].shape[1] for b in blocks) <= CHUNK
    for stem in ("target", "residual"):
        got = np.concatenate([b[stem] for b in blocks], axis=1)[0]
        assert np.max(np.abs(got - ref["mix"][stem])) < 1e-4


def test_a_source_at_another_rate_is_resampled_to_48k_and_back(sam, engine):
    _, ref, _ = sam
    out = extract(engine, MIX_44K, 44100, "mono", spans=SPANS, offset=1.0)
    for stem in ("target", "residual"):
        want = A.resample(ref["mix_44k"][stem][None], SR, 44100)[0]
        got = out[stem]
        assert got.shape == MIX_44K.shape
        assert np.max(np.abs(got[0] - want)) < 1e-4 and np.max(np.abs(got[1] - want)) < 1e-4


def test_spans_and_the_prompt_steer_the_model(engine):
    mono = S.ArraySignal(MIX[:1, :CHUNK])
    base = engine.stream_prompted(MODEL, mono, SR, None, PROMPT, [("+", 0.1, 0.2)])["target"].to_array()
    no_span = engine.stream_prompted(MODEL, mono, SR, None, PROMPT, [])["target"].to_array()
    other = engine.stream_prompted(MODEL, mono, SR, None, "drums and bass", [("+", 0.1, 0.2)])["target"].to_array()
    trimmed = engine.stream_prompted(MODEL, mono, SR, None, PROMPT.strip(), [("+", 0.1, 0.2)])["target"].to_array()
    assert np.max(np.abs(base - no_span)) > 1e-6 and np.max(np.abs(base - other)) > 1e-6
    assert np.array_equal(base, trimmed)  # used as given after trimming


def test_silence_is_not_sent_to_the_model(engine):
    out = extract(engine, np.zeros((2, 4000), np.float32), SR, "mid_sides")
    assert all(np.array_equal(s, np.zeros((2, 4000), np.float32)) for s in out.values())


def test_the_model_needs_a_prompt(engine):
    with pytest.raises(PresetError, match="prompt"):
        engine.run_model(MODEL, MIX, SR)
    with pytest.raises(PresetError, match="empty"):
        engine.stream_prompted(MODEL, S.ArraySignal(MIX), SR, None, "   ", [])


def test_a_checkpoint_that_does_not_fit_its_config_is_refused(tmp_path, sam):
    _, _, files = sam
    narrow = write_random_sam(tmp_path / "narrow", MODEL, seed=2, width=16)
    store = ModelStore(tmp_path / "store")
    store.install(
        MODEL,
        [
            files[f"{MODEL}.config.json"],
            narrow[f"{MODEL}.safetensors"],
            *(files[f] for f in files if f.startswith("t5-base")),
        ],
    )
    with pytest.raises(ModelNotInstalled, match="does not fit"):
        Engine(store).separator(MODEL)


def test_metas_zero_video_term_is_restored_from_its_weights(tmp_path, sam):
    """Meta's model adds tanh(g) * LayerNorm(conv(zero video features)) to each frame; the port drops it."""
    torch = pytest.importorskip("torch")
    import mlx.core as mx

    _, _, files = sam
    raw = dict(mx.load(str(files[f"{MODEL}.safetensors"])))
    width, vision = raw["proj.bias"].shape[0], 12
    rng = np.random.default_rng(4)
    meta = {
        "align_masked_video.conv.weight": rng.standard_normal((width, vision, 1)),
        "align_masked_video.conv.bias": rng.standard_normal(width),
        "align_masked_video.gate": np.array([0.6]),
        "align_masked_video.layer_norm.weight": rng.standard_normal(width),
        "align_masked_video.layer_norm.bias": rng.standard_normal(width),
    }
    with_video = tmp_path / f"{MODEL}.safetensors"
    mx.save_safetensors(str(with_video), {**raw, **{k: mx.array(v.astype(np.float32)) for k, v in meta.items()}})
    store = ModelStore(tmp_path / "store")
    store.install(MODEL, [with_video, *(p for name, p in files.items() if name != with_video.name)], params=PARAMS)
    got = np.asarray(Engine(store).separator(MODEL).model.proj.bias) - np.asarray(raw["proj.bias"])
    conv, norm = torch.nn.Conv1d(vision, width, 1), torch.nn.LayerNorm(width)  # Meta's AlignModalities
    with torch.no_grad():
        conv.weight[:], conv.bias[:] = (
            torch.tensor(meta[k], dtype=torch.float32)
            for k in ("align_masked_video.conv.weight", "align_masked_video.conv.bias")
        )
        norm.weight[:], norm.bias[:] = (
            torch.tensor(meta[k], dtype=torch.float32)
            for k in ("align_masked_video.layer_norm.weight", "align_masked_video.layer_norm.bias")
        )
        frames = norm(conv(torch.zeros(1, vision, 7)).permute(0, 2, 1)) * np.tanh(0.6)
    assert np.max(np.abs(got - frames[0].numpy())) < 1e-5  # the same term on every frame


def test_models_list_reports_the_installed_model(sam):
    store, _, _ = sam
    done = subprocess.run(
        [sys.executable, "-m", "stems.cli", "models", "list", "--json", "--model-dir", str(store.root)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    rows = {r["id"]: r for r in json.loads(done.stdout)}
    assert rows[MODEL]["installed"] == "yes" and rows[MODEL]["queue"] == "gpu-sam"
    assert rows["sam-audio-large"]["installed"] == "no" and "not installed" in rows["sam-audio-large"]["reason"]


@pytest.mark.parametrize(
    "n, want",
    [
        (100, [(0, 100)]),
        (CHUNK, [(0, CHUNK)]),
        (CHUNK + 1, [(0, CHUNK), (CHUNK - OVERLAP, CHUNK + 1)]),
        (19200, [(0, CHUNK), (7680, 19200)]),
        (30000, [(0, CHUNK), (7680, 19200), (15360, 26880), (23040, 30000)]),
    ],
)
def test_chunk_bounds_cover_the_signal_with_overlaps(n, want):
    assert chunk_bounds(n, CHUNK, OVERLAP) == want


def test_anchors_are_clipped_and_moved_into_each_chunk():
    anchors = [("+", 0.1, 0.3), ("-", 0.5, 0.6)]
    assert shift_anchors(anchors, 0.0, 0.24) == [("+", 0.1, 0.24)]
    assert shift_anchors(anchors, 0.16, 0.56) == [
        ("+", 0.0, pytest.approx(0.14)),
        ("-", pytest.approx(0.34), pytest.approx(0.40)),
    ]
    assert shift_anchors(anchors, 0.7, 0.9) == []
    fade = crossfade(5)
    assert fade[0] == 0.0 and fade[-1] == 1.0 and np.all(np.diff(fade) > 0)
