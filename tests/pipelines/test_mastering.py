"""Mastering (pipelines/mastering.py): the streaming meter agrees with pyloudnorm, the limiter holds its
ceiling, and every preset lands on its target on real and synthetic music, measured independently."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyloudnorm
import pytest
import soundfile as sf
from scipy import signal as sps

from pipelines import mastering as M
from pipelines.errors import AudioError
from tests.support import tone_mix

CORPUS = Path("/work/shared/corpus")
REAL = CORPUS / "real" / "musdb7s_falcon69" / "mixture.flac"
SYNTHETIC = sorted(CORPUS.glob("rendered/track_seed*/mixture.flac"))


def true_peak_db(y: np.ndarray) -> float:
    """An independent reader's true peak: scipy's polyphase resampler, 4x, on (frames, channels)."""
    return 20 * math.log10(float(np.abs(sps.resample_poly(y, 4, 1, axis=0)).max()))


def blocks_of(audio: np.ndarray, size: int):
    return lambda: (audio[:, i : i + size] for i in range(0, audio.shape[1], size))


def run(audio: np.ndarray, sr: int, preset: str, block: int = 44100) -> tuple[M.MasterReport, np.ndarray]:
    out: list[np.ndarray] = []
    report = M.master(
        blocks_of(audio, block), sr, audio.shape[0], preset, lambda: (out.clear() or out.append, lambda: None)
    )
    return report, np.concatenate(out, axis=1)


@pytest.mark.parametrize("seconds,block", [(5.0, 44100), (7.3, 1000), (3.0, 300000)])
def test_streaming_meter_equals_pyloudnorm(seconds, block):
    """The block-by-block BS.1770 meter gives pyloudnorm's whole-array figure, whatever the block size."""
    audio = tone_mix(seconds, 44100, seed=3)
    meter = M.LoudnessMeter(44100, 2)
    for i in range(0, audio.shape[1], block):
        meter.push(audio[:, i : i + block])
    assert meter.integrated() == pytest.approx(pyloudnorm.Meter(44100).integrated_loudness(audio.T), abs=0.01)


def test_limiter_holds_the_ceiling_on_intersample_peaks():
    """A full-scale tone at fs/4 with a 45 degree phase has true peaks 3 dB over its samples: they are limited."""
    sr = 48000
    n = np.arange(sr * 2)
    x = np.sin(2 * np.pi * n / 4 + np.pi / 4) / (np.sqrt(0.5))  # samples at +-1, true peak +3 dB
    audio = np.stack([x, x]) * 0.99
    out = []
    lim = M.Limiter(sr, 2, -1.0)
    for i in range(0, audio.shape[1], 7000):
        out.extend(lim.push(audio[:, i : i + 7000]))
    out.extend(lim.flush())
    y = np.concatenate(out, axis=1)
    assert y.shape == audio.shape  # nothing lost, nothing added: the lag is taken back at the end
    assert true_peak_db(y.T) <= -1.0
    assert true_peak_db(audio.T) > 2.0  # the input really was over


def test_limiter_leaves_quiet_audio_alone():
    audio = tone_mix(3.0, 44100, seed=1) * 0.1
    out = []
    lim = M.Limiter(44100, 2, -1.0)
    for i in range(0, audio.shape[1], 5000):
        out.extend(lim.push(audio[:, i : i + 5000]))
    out.extend(lim.flush())
    np.testing.assert_allclose(np.concatenate(out, axis=1), audio, atol=1e-7)


def _music() -> list[tuple[str, Path]]:
    files = [("musdb", REAL)] if REAL.exists() else []
    return files + [(p.parent.name, p) for p in SYNTHETIC[:1]]


@pytest.mark.parametrize("preset", sorted(M.PRESETS))
@pytest.mark.parametrize(
    "name,path",
    _music() or [pytest.param("none", None, marks=pytest.mark.skip(reason="no corpus at /work/shared/corpus"))],
)
def test_presets_reach_their_targets_on_music(name, path, preset):
    """Integrated loudness within 0.5 LU of the target, true peak at or under the ceiling (pyloudnorm and
    scipy's 4x resampler, not our meters); the tonal balance moves at most 2 dB."""
    data, sr = sf.read(path, dtype="float32", always_2d=True)
    report, y = run(data.T, sr, preset)
    p = M.PRESETS[preset]
    lufs = pyloudnorm.Meter(sr).integrated_loudness(y.T.astype(np.float64))
    assert abs(lufs - p.target_lufs) <= 0.5, (name, preset, lufs, report)
    assert true_peak_db(y.T) <= p.ceiling_dbtp, (name, preset, report)
    assert report.result.integrated_lufs == pytest.approx(lufs, abs=0.01)
    assert abs(report.low_shelf_db) <= 2 and abs(report.high_shelf_db) <= 2
    assert y.shape == data.T.shape
    print(
        f"{name} {preset}: source {report.source.integrated_lufs:.2f} LUFS {report.source.true_peak_dbtp:.2f} dBTP "
        f"-> {lufs:.2f} LUFS {true_peak_db(y.T):.2f} dBTP LRA {report.result.loudness_range_lu:.2f} "
        f"(gain {report.gain_db} dB, shelves {report.low_shelf_db}/{report.high_shelf_db} dB, "
        f"{report.renders} renders)"
    )


def test_block_size_does_not_change_the_result():
    audio = tone_mix(4.0, 44100, seed=2) * 1.5  # hot: the limiter works
    _, a = run(audio, 44100, "loud", block=44100)
    _, b = run(audio, 44100, "loud", block=777)
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_silence_and_unknown_presets_are_refused():
    with pytest.raises(AudioError, match="silent"):
        run(np.zeros((2, 44100 * 2), np.float32), 44100, "streaming")
    with pytest.raises(AudioError, match="unknown mastering preset"):
        M.preset("radio")
