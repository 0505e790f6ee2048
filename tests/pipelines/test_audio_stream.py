"""Block-wise audio I/O equals whole-array I/O: decode to file, WAV, HQ encodes, signal files."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from pipelines import audio as A, signals as S
from tests.support import tone_mix, write_audio

SR = 44100


@pytest.fixture(scope="module")
def song(tmp_path_factory):
    return write_audio(tmp_path_factory.mktemp("song") / "song.flac", tone_mix(25.0, SR), SR, "PCM_24", "FLAC")


@pytest.mark.parametrize("start, end", [(0.0, None), (3.25, 21.5)])
def test_decode_to_file_equals_decode(song, tmp_path, start, end):
    whole, sr = A.decode(song, start, end)
    f, sr2 = A.decode_to_file(song, tmp_path / "mix.npy", start, end, digest=True)
    assert sr2 == sr
    np.testing.assert_array_equal(f.to_array(), whole)
    assert f.digest == S.content_digest(S.ArraySignal(whole))
    assert f.peak == pytest.approx(float(np.abs(whole).max()))
    np.testing.assert_array_equal(f.read(12345, 67890), whole[:, 12345:67890])


def test_frame_file_stays_readable_after_unlink(tmp_path):
    w = S.FrameWriter(tmp_path / "a.npy")
    w.write(np.arange(20, dtype=np.float32).reshape(2, 10))
    f = w.close()
    f.path.unlink()
    np.testing.assert_array_equal(f.read(2, 5), np.arange(20, dtype=np.float32).reshape(2, 10)[:, 2:5])


@pytest.mark.parametrize("bit_depth", [16, 24, 32])
def test_block_wav_is_the_whole_array_wav(tmp_path, bit_depth):
    audio = (0.6 * np.random.default_rng(0).standard_normal((2, 3 * SR + 17))).astype(np.float32)
    sf.write(
        str(tmp_path / "whole.wav"),
        np.clip(audio.T, -1, 1) if bit_depth != 32 else audio.T,
        SR,
        subtype=A.WAV_SUBTYPES[bit_depth],
        format="WAV",
    )
    with A.WavWriter(tmp_path / "blocks.wav", SR, 2, bit_depth) as w:
        for lo in range(0, audio.shape[1], 10007):
            w.write(audio[:, lo : lo + 10007])
    assert (tmp_path / "blocks.wav").read_bytes() == (tmp_path / "whole.wav").read_bytes()


@pytest.mark.parametrize("fmt, sr", [("aac", SR), ("mp3", 22050), ("opus", SR), ("flac", SR)])
def test_block_hq_encode_decodes_like_the_whole_array_encode(tmp_path, fmt, sr):
    audio = (0.3 * np.random.default_rng(1).standard_normal((2, 4 * sr + 123))).astype(np.float32)
    ext = A.hq_extension(fmt)
    A.encode_hq(tmp_path / f"whole.{ext}", audio, sr, fmt)
    with A.HqEncoder(tmp_path / f"blocks.{ext}", sr, 2, fmt) as enc:
        for lo in range(0, audio.shape[1], 9999):
            enc.write(audio[:, lo : lo + 9999])
    a, ra = A.decode(tmp_path / f"whole.{ext}")
    b, rb = A.decode(tmp_path / f"blocks.{ext}")
    assert ra == rb and a.shape == b.shape
    np.testing.assert_array_equal(a, b)


def test_streamed_resample_equals_one_shot(tmp_path):
    audio = (0.3 * np.random.default_rng(2).standard_normal((2, 5 * 48000 + 11))).astype(np.float32)
    out = A.resample_signal(S.ArraySignal(audio), 48000, SR, S.FrameWriter(tmp_path / "r.npy"), block=7001)
    np.testing.assert_array_equal(out.to_array(), A.resample(audio, 48000, SR))
