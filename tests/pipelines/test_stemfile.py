"""DJ stem files (pipelines/stemfile.py, pipelines/mp4box.py): NI's layout and metadata, read back by libavformat.

The second reader is PyAV (FFmpeg's mov demuxer and AAC decoder: what ffprobe and Mixxx use), independent of
our box writer; ffprobe itself is asked too where it is installed.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf

from pipelines import mp4box
from pipelines.errors import AudioError
from pipelines.stemfile import NI_ORDER, write_stem_mp4
from tests.support import tone_mix

REAL = Path("/work/shared/corpus/real/musdb7s_falcon69")
SR = 44100


def decode_all(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as c:
        out = []
        for stream in c.streams.audio:
            c.seek(0)
            out.append(np.concatenate([f.to_ndarray() for f in c.decode(stream)], axis=1))
        return out


def snr_db(ref: np.ndarray, got: np.ndarray) -> float:
    n = ref.shape[1]
    return 10 * np.log10((ref**2).sum() / ((got[:, :n] - ref) ** 2).sum())


def _stems(tmp: Path) -> dict[str, Path]:
    """The MUSDB excerpt's four stems where the corpus is mounted, else four synthetic parts."""
    stems = {}
    for i, name in enumerate(NI_ORDER):
        data = sf.read(REAL / f"{name}.flac")[0] if REAL.exists() else tone_mix(3.0, SR, seed=i).T * 0.5
        stems[name] = tmp / f"{name}.wav"
        sf.write(stems[name], data, SR, subtype="PCM_24")
    return stems


def test_a_stem_file_has_nis_tracks_metadata_and_the_stems(tmp_path):
    stems = _stems(tmp_path)
    path = write_stem_mp4(tmp_path / "song.stem.mp4", stems)
    meta = json.loads(mp4box.user_box(path, b"stem"))
    assert [s["name"] for s in meta["stems"]] == ["Drums", "Bass", "Other", "Vocals"]
    assert all(s["color"].startswith("#") and len(s["color"]) == 7 for s in meta["stems"])
    with av.open(str(path)) as c:
        tracks = c.streams.audio
        assert len(tracks) == 5 and len(c.streams) == 5
        assert [(t.codec_context.name, t.sample_rate, t.channels) for t in tracks] == [("aac", SR, 2)] * 5
        # only the mixture plays in an ordinary player
        assert [bool(t.disposition & av.stream.Disposition.default) for t in tracks] == [True] + [False] * 4
    refs = [sf.read(stems[n], dtype="float32")[0].T for n in NI_ORDER]
    decoded = decode_all(path)
    for i, (ref, got) in enumerate(zip([sum(refs)] + refs, decoded)):
        assert got.shape[1] - ref.shape[1] in range(0, 2048), i  # padded to whole AAC frames, never short
        assert snr_db(ref, got) > 20, (i, snr_db(ref, got))  # 256 kb/s AAC, aligned: its priming is trimmed
    # track i is stem i: each decoded track is closest to its own stem
    for i, got in enumerate(decoded[1:]):
        assert int(np.argmax([snr_db(ref, got) for ref in refs])) == i


@pytest.mark.skipif(shutil.which("ffprobe") is None, reason="ffprobe is not installed (apt-get install ffmpeg)")
def test_ffprobe_reads_the_stem_file(tmp_path):
    path = write_stem_mp4(tmp_path / "song.stem.mp4", _stems(tmp_path))
    out = subprocess.run(
        ["ffprobe", "-v", "error", "-show_streams", "-of", "json", str(path)],
        capture_output=True,
        text=True,
        check=True,
    )
    streams = json.loads(out.stdout)["streams"]
    assert [(s["codec_name"], s["codec_type"]) for s in streams] == [("aac", "audio")] * 5


@pytest.mark.parametrize("faststart", [False, True])
def test_adding_a_user_box_keeps_every_sample(tmp_path, faststart):
    """With moov before mdat, the chunk offsets move by the bytes the box adds; after it, nothing moves."""
    path = tmp_path / "a.mp4"
    opts = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", format="mp4", options=opts) as out:
        streams = [out.add_stream("aac", rate=SR, layout="stereo") for _ in range(2)]
        audio = tone_mix(2.0, SR)
        for s in streams:
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(audio), format="fltp", layout="stereo")
            frame.sample_rate, frame.pts = SR, 0
            out.mux(s.encode(frame))
            out.mux(s.encode(None))
    with open(path, "rb") as f:
        order = [b.type for b in mp4box.top_level(f)]
    assert (order.index(b"moov") < order.index(b"mdat")) == faststart
    before = decode_all(path)
    mp4box.add_user_box(path, b"stem", b'{"a": 1}')
    mp4box.add_user_box(path, b"xtra", b"second")  # into the udta the first one made (or found)
    assert mp4box.user_box(path, b"stem") == b'{"a": 1}' and mp4box.user_box(path, b"xtra") == b"second"
    after = decode_all(path)
    assert all(np.array_equal(a, b) for a, b in zip(before, after)) and len(after) == 2
    with open(path, "rb") as f:
        buf = f.read()
    assert len(mp4box.find(buf, [b"moov", b"udta"])) == 1


def test_a_broken_mp4_is_a_clear_error(tmp_path):
    path = tmp_path / "bad.mp4"
    path.write_bytes(struct.pack(">I4s", 100, b"ftyp") + b"x" * 10)
    with pytest.raises(AudioError, match="claims 100 bytes"):
        mp4box.add_user_box(path, b"stem", b"{}")
    with pytest.raises(AudioError, match="missing: vocals"):
        write_stem_mp4(tmp_path / "x.stem.mp4", {n: path for n in NI_ORDER[:3]})
