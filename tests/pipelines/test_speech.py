"""The speech family with its real weights: each model must raise the SNR of a noisy voiced signal and stay aligned."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipelines.engine import Engine
from pipelines.modelstore import ModelStore
from tests.support import shared_models

# pinned in shared/models/README.md
SHARED_FILES = {
    "gtcrn.onnx": ("gtcrn/gtcrn.onnx", "f648b02f2d7ff96ebcb0eec2219688a08ed12fe7e3d50f248605a90eba8cad17"),
    "dtln_model_1.onnx": ("dtln/model_1.onnx", "22b91cae3855e5a0620e66a917ca6c82c58db0e842c770f58d86751c5e8d4ae3"),
    "dtln_model_2.onnx": ("dtln/model_2.onnx", "e20c92f9233fccf29cddf86970d0d0161a03aebccc26d6f4d5639c4d5ec2e639"),
}
STORE_MODELS = {
    "gtcrn": ["gtcrn.onnx"],
    "dtln": ["dtln_model_1.onnx", "dtln_model_2.onnx"],
    "deepfilternet3_dtln": ["dtln_model_1.onnx", "dtln_model_2.onnx"],
}


def voiced(sr: int, seconds: float = 3.0, seed: int = 0) -> np.ndarray:
    """A speech-like signal: a harmonic voice with gliding pitch, moving formants and syllable-like bursts."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(sr * seconds)) / sr
    f0 = 140 + 40 * np.sin(2 * np.pi * 0.7 * t) + 20 * np.sin(2 * np.pi * 2.3 * t + rng.uniform(0, 6))
    phase = 2 * np.pi * np.cumsum(f0) / sr
    x = np.zeros_like(t)
    for k in range(1, 40):
        amp = (1 + 0.8 * np.sin(2 * np.pi * (0.5 + 0.1 * k) * t)) / k
        x += np.where(k * f0 < 0.45 * sr, amp * np.sin(k * phase), 0.0)
    envelope = np.clip(1.2 * np.sin(2 * np.pi * 3.0 * t), 0, 1) ** 0.7 * (np.sin(2 * np.pi * 0.4 * t) > -0.6)
    x *= envelope
    return (0.2 * x / np.max(np.abs(x))).astype(np.float32)


def noise(n: int, kind: str, sr: int, seed: int = 1) -> np.ndarray:
    """White noise, or pink (1/f power) noise above 50 Hz: sub-audio rumble would dominate its energy otherwise."""
    rng = np.random.default_rng(seed)
    white = rng.standard_normal(n)
    if kind == "white":
        return white
    freqs = np.fft.rfftfreq(n, 1 / sr)
    return np.fft.irfft(np.fft.rfft(white) / np.sqrt(np.maximum(freqs, 50.0)), n)


def snr(ref: np.ndarray, est: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(ref**2) / np.sum((ref - est) ** 2)))


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Engine:
    store = ModelStore(tmp_path_factory.mktemp("models"))
    shared = shared_models()
    if shared is not None:
        for model_id, names in STORE_MODELS.items():
            entry = store.install(model_id, [_copy(shared, name, tmp_path_factory) for name in names])
            for name in names:
                assert entry["files"][name] == SHARED_FILES[name][1], (
                    f"{name} differs from the copy pinned in the README"
                )
    return Engine(store)


def _copy(shared: Path, name: str, tmp_path_factory) -> Path:
    """The shared file under the name the registry gives it."""
    dst = tmp_path_factory.mktemp("src") / name
    dst.write_bytes((shared / SHARED_FILES[name][0]).read_bytes())
    return dst


CASES = [  # model, its rate, noise, least improvement in dB (each measured at least 6 dB better)
    ("deepfilternet3", 48000, "white", 4.0),
    ("deepfilternet3", 48000, "pink", 4.0),
    ("rnnoise", 48000, "white", 4.0),
    ("rnnoise", 48000, "pink", 4.0),
    ("gtcrn", 16000, "white", 4.0),
    ("gtcrn", 16000, "pink", 4.0),
    ("dtln", 16000, "white", 4.0),
    ("dtln", 16000, "pink", 4.0),
    ("deepfilternet3_dtln", 48000, "white", 4.0),
    ("deepfilternet3_dtln", 48000, "pink", 4.0),
]


@pytest.mark.parametrize("model_id, sr, kind, gain", CASES)
def test_model_improves_snr_and_stays_aligned(engine, model_id, sr, kind, gain):
    """Speech plus noise at 0 dB SNR."""
    if model_id in STORE_MODELS and shared_models() is None:
        pytest.skip("the pretrained GTCRN/DTLN files (shared/models) are not on this machine; set STEMS_SHARED_MODELS")
    speech = voiced(sr)
    n = noise(speech.size, kind, sr)
    n *= np.sqrt(np.sum(speech**2) / np.sum(n**2))
    mix = (speech + n).astype(np.float32)[None]
    out = engine.run_model(model_id, mix, sr)

    est = out["speech"][0]
    assert out["speech"].shape == mix.shape and out["noise"].shape == mix.shape
    assert np.max(np.abs(out["speech"] + out["noise"] - mix)) < 1e-6
    assert snr(speech, est) > snr(speech, mix[0]) + gain
    # aligned: shifting the output by any lag within 20 ms does not beat lag 0 by more than a rounding's worth
    lags = range(-int(0.02 * sr), int(0.02 * sr) + 1)
    corr = {lag: float(np.dot(np.roll(est, -lag)[sr // 10 : -sr // 10], speech[sr // 10 : -sr // 10])) for lag in lags}
    assert abs(max(corr, key=corr.get)) <= 1


def test_calls_are_independent_and_stereo_runs_per_channel(engine):
    sr = 48000
    speech = voiced(sr, 1.5, seed=2)
    mix = np.stack(
        [speech + 0.05 * noise(speech.size, "white", sr, 3), speech + 0.05 * noise(speech.size, "white", sr, 4)]
    )
    mix = mix.astype(np.float32)
    first = engine.run_model("deepfilternet3", mix[:1], sr)["speech"]
    stereo = engine.run_model("deepfilternet3", mix, sr)["speech"]
    again = engine.run_model("deepfilternet3", mix[:1], sr)["speech"]
    assert np.array_equal(first, again)
    assert np.array_equal(stereo[:1], first)
    assert stereo.shape == mix.shape


def test_resampled_input_comes_back_at_its_rate(engine):
    """A 44.1 kHz stereo source through a 48 kHz mono model: same shape, still enhanced."""
    sr = 44100
    speech = voiced(sr, 2.0, seed=5)
    mix = np.stack([speech, speech]) + 0.05 * np.stack(
        [noise(speech.size, "white", sr, 6), noise(speech.size, "white", sr, 7)]
    )
    out = engine.run_model("deepfilternet3", mix.astype(np.float32), sr)["speech"]
    assert out.shape == mix.shape
    assert snr(np.stack([speech, speech]), out) > snr(np.stack([speech, speech]), mix) + 3.0


# model -> largest difference from the whole-signal run: frame streams repeat its every operation;
# the ensemble's running FIR sums a different number of terms per block (equal here, but not by construction)
STREAMED = {"deepfilternet3": 0.0, "rnnoise": 0.0, "dtln": 0.0, "gtcrn": 0.0, "deepfilternet3_dtln": 1e-6}


@pytest.mark.parametrize("model_id", sorted(STREAMED))
def test_streamed_in_blocks_equals_the_whole_signal(engine, model_id, tmp_path):
    """The recurrent state carries across blocks: an hour streams in constant memory with a whole run's samples."""
    if model_id in STORE_MODELS and shared_models() is None:
        pytest.skip("the pretrained GTCRN/DTLN files (shared/models) are not on this machine; set STEMS_SHARED_MODELS")

    from pipelines import signals as S

    sr, tolerance = (16000 if model_id in ("dtln", "gtcrn") else 48000), STREAMED[model_id]
    speech = voiced(sr, 2.5, seed=8)
    mix = np.stack(
        [speech + 0.1 * noise(speech.size, "pink", sr, 9), speech + 0.1 * noise(speech.size, "white", sr, 10)]
    )
    mix = mix.astype(np.float32)
    sep = engine.separator(model_id)
    whole = sep.separate(mix, sr)
    blocks = list(sep.stream(S.ArraySignal(mix), sr, 1237, lambda: False))  # blocks of no frame's size
    assert len(blocks) > 10
    for source in whole:
        streamed = np.concatenate([b[source] for b in blocks], axis=1)
        assert streamed.shape == mix.shape
        assert np.max(np.abs(streamed - whole[source])) <= tolerance, source
    # through the engine's chunked path with a workdir, as a worker runs it
    chunked = Engine(engine.store, chunk_seconds=0.3)
    chunked._warm[model_id] = sep
    out = chunked.stream_model(model_id, S.ArraySignal(mix), sr, tmp_path)
    for source in whole:
        assert np.max(np.abs(out[source].to_array() - whole[source])) <= tolerance, source
