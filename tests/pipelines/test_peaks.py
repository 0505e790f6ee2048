"""Waveform peaks: audiowaveform's JSON form, the same however the audio is cut into blocks."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.peaks import POINTS, PeakAccumulator, resolution


def reference(audio: np.ndarray, spp: int, bits: int) -> list[int]:
    """Min and max of each run of `spp` frames, per point then per channel (audiowaveform version 2)."""
    scale = 2 ** (bits - 1) - 1
    out = []
    for lo in range(0, audio.shape[1], spp):
        for ch in audio[:, lo : lo + spp]:
            out += [max(-scale - 1, int(np.floor(ch.min() * scale))), min(scale, int(np.ceil(ch.max() * scale)))]
    return out


@pytest.mark.parametrize("channels,frames,bits", [(2, 44100 * 3 + 17, 16), (1, 5000, 8), (2, 31, 16)])
def test_blocks_of_any_size_give_the_reference(channels, frames, bits):
    rng = np.random.default_rng(channels + frames)
    audio = (rng.standard_normal((channels, frames)) * 0.3).clip(-1.2, 1.2).astype(np.float32)
    one = PeakAccumulator(44100, channels, frames, bits=bits)
    one.feed(audio)
    many = PeakAccumulator(44100, None, frames, bits=bits)  # channels taken from the first block
    cuts = np.sort(rng.integers(0, frames, 7))
    for block in np.split(audio, cuts, axis=1):
        many.feed(block)
    a, b = one.result(), many.result()
    assert a == b
    spp = resolution(frames)
    assert a["samples_per_pixel"] == spp and a["length"] == -(-frames // spp)
    assert a["data"] == reference(audio, spp, bits)
    assert set(a) == {"version", "channels", "sample_rate", "samples_per_pixel", "bits", "length", "data"}
    assert (a["version"], a["channels"], a["sample_rate"], a["bits"]) == (2, channels, 44100, bits)
    assert len(a["data"]) == a["length"] * channels * 2


def test_resolution_keeps_long_tracks_small():
    hour = 3600 * 48000
    assert resolution(hour) == -(-hour // POINTS)  # about POINTS points, whatever the length
    assert resolution(1000) == 32  # short audio: at least 32 frames a point
    assert resolution(None) == 256


def test_quiet_audio_is_not_drawn_flat_and_overs_clip():
    quiet = np.full((1, 64), 1e-6, dtype=np.float32)
    acc = PeakAccumulator(8000, 1, samples_per_pixel=64)
    acc.feed(quiet)
    acc.feed(np.array([[2.0, -2.0]], dtype=np.float32))
    data = acc.result()["data"]
    assert data[:2] == [0, 1]  # ceil: a non-zero max is at least one step
    assert data[2:] == [-32768, 32767]


def test_a_block_of_the_wrong_width_is_refused():
    acc = PeakAccumulator(8000, 2)
    with pytest.raises(ValueError, match="channels"):
        acc.feed(np.zeros((1, 10), dtype=np.float32))
