"""Ensembles declared in preset data: two installed models' estimates of a stem combined (pipelines/ensemble.py)."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.ensemble import MagnitudeMeanSignal, MeanSignal, combine
from pipelines.signals import ArraySignal

SR = 44100


@pytest.fixture(scope="module")
def estimates() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    return tuple(rng.standard_normal((2, 30_000)).astype(np.float32) for _ in range(2))


def _magnitude_mean_reference(a: np.ndarray, b: np.ndarray, n_fft: int = 2048, hop: int = 512) -> np.ndarray:
    """Whole-signal STFT frame by frame (zeros beyond the ends), mean magnitude with the mean's phase, overlap-add."""
    window = np.hanning(n_fft + 1)[:-1]  # periodic Hann
    n = a.shape[1]
    pad = n_fft
    x = [np.pad(s.astype(np.float64), ((0, 0), (pad, pad))) for s in (a, b)]
    out = np.zeros((2, n + 2 * pad))
    norm = np.zeros(n + 2 * pad)
    first = -((n_fft // 2 - 1) // hop) * hop  # the first frame centre k * hop whose frame reaches sample 0
    for centre in range(first, n + n_fft // 2, hop):  # every frame that touches the signal
        lo = centre - n_fft // 2 + pad
        spectra = [np.fft.rfft(s[:, lo : lo + n_fft] * window) for s in x]
        mean = (spectra[0] + spectra[1]) / 2
        frame = np.fft.irfft((np.abs(spectra[0]) + np.abs(spectra[1])) / 2 * np.exp(1j * np.angle(mean)), n=n_fft)
        out[:, lo : lo + n_fft] += frame * window
        norm[lo : lo + n_fft] += window**2
    return (out / np.where(norm > 0, norm, 1))[:, pad : pad + n]


def test_mean_wave_is_the_mean(estimates):
    a, b = estimates
    np.testing.assert_allclose(
        combine("mean_wave", [ArraySignal(a), ArraySignal(b)]).read(100, 20_000),
        ((a + b) / 2)[:, 100:20_000],
        atol=1e-7,
    )


def test_mean_magnitude_matches_a_frame_by_frame_reference(estimates):
    a, b = estimates
    ours = MagnitudeMeanSignal([ArraySignal(a), ArraySignal(b)]).read(0, a.shape[1])
    assert np.abs(ours - _magnitude_mean_reference(a, b)).max() <= 1e-4


def test_mean_magnitude_read_in_pieces_equals_one_read(estimates):
    a, b = estimates
    signal = combine("mean_magnitude", [ArraySignal(a), ArraySignal(b)])
    whole = signal.read(0, signal.frames)
    pieces = np.concatenate([signal.read(lo, min(signal.frames, lo + 777)) for lo in range(0, signal.frames, 777)], 1)
    np.testing.assert_array_equal(pieces, whole)


def test_identical_estimates_come_back(estimates):
    a, _ = estimates
    for signal in (MeanSignal([ArraySignal(a)] * 2), MagnitudeMeanSignal([ArraySignal(a)] * 2)):
        assert np.abs(signal.read(0, signal.frames) - a).max() <= 1e-5


def test_unknown_method_is_refused(estimates):
    with pytest.raises(ValueError, match="unknown ensemble method"):
        combine("max", [ArraySignal(estimates[0])])


def test_preset_ensemble_of_two_random_roformers_is_their_mean(tmp_path):
    """2_tracks' first chain averages BS-RoFormer and Mel-Band RoFormer; with one of them, the next chain serves."""
    pytest.importorskip("bs_roformer")
    from pipelines.engine import Engine
    from pipelines.modelstore import ModelStore
    from tools.roformer_models import install_random_roformer

    mix = (0.1 * np.random.default_rng(4).standard_normal((2, 30_000))).astype(np.float32)
    store = ModelStore(tmp_path / "store")
    install_random_roformer(store, "bs_roformer_viperx_1297", seed=1)
    engine = Engine(store)
    alone = engine.run("2_tracks", mix, SR)
    assert alone.chain_index == 1 and set(alone.made_by.values()) == {"bs_roformer_viperx_1297"}

    install_random_roformer(store, "mel_band_roformer_kj", seed=2)
    result = engine.run("2_tracks", mix, SR)
    assert result.chain_index == 0
    assert result.made_by == {
        "vocals": "bs_roformer_viperx_1297+mel_band_roformer_kj",
        "instrumental": "bs_roformer_viperx_1297+mel_band_roformer_kj",
    }
    first = engine.run_model("bs_roformer_viperx_1297", mix, SR)
    second = engine.run_model("mel_band_roformer_kj", mix, SR)
    for stem in ("vocals", "instrumental"):
        assert np.abs(first[stem] - second[stem]).max() > 1e-3  # two different estimates
        np.testing.assert_allclose(result.stems[stem], (first[stem] + second[stem]) / 2, atol=1e-6)
