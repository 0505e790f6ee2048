"""DJ stem files: Native Instruments' Stem format (`.stem.mp4`), read by Traktor, Mixxx and Serato.

One MP4 with five AAC tracks in NI's order: the mixture, then drums, bass, other and vocals
(only the mixture track is enabled, so a plain player plays the mix), and NI's `stem` box in
moov/udta holding JSON that names and colours the four stems (written by `pipelines/mp4box.py`:
no muxer we can install writes it; stempeg's writer calls gpac's MP4Box for it).

The mixture is the sum of the four stems, so the DJ's faders at unity give back the master
track. Encoding streams: a block of each stem at a time is read, summed and encoded.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import av
import numpy as np

from .errors import AudioError
from .mp4box import add_user_box

NI_ORDER = ("drums", "bass", "other", "vocals")
# stempeg's default metadata (the colours Traktor shows for a stem file made by its tools)
COLOURS = {"drums": "#009E73", "bass": "#D55E00", "other": "#CC79A7", "vocals": "#56B4E9"}
MASTERING_DSP = {  # NI's stem-creator defaults, both off: the tracks play as they are
    "compressor": {
        "enabled": False,
        "ratio": 3,
        "output_gain": 0.5,
        "release": 0.3,
        "attack": 0.003,
        "input_gain": 0.5,
        "threshold": 0,
        "hp_cutoff": 300,
        "dry_wet": 50,
    },
    "limiter": {"enabled": False, "release": 0.05, "threshold": 0, "ceiling": -0.35},
}
AAC_BIT_RATE = 256_000
BLOCK = 1 << 16


def metadata(names: tuple[str, ...] = NI_ORDER) -> dict[str, Any]:
    return {
        "version": 1,
        "mastering_dsp": MASTERING_DSP,
        "stems": [{"name": n.capitalize(), "color": COLOURS[n]} for n in names],
    }


def write_stem_mp4(dest: Path, stems: dict[str, Path], bit_rate: int = AAC_BIT_RATE) -> Path:
    """Write `dest` from the four stems' audio files (named by `NI_ORDER`), all at one rate and length."""
    import soundfile as sf

    missing = [n for n in NI_ORDER if n not in stems]
    if missing:
        raise AudioError(f"a stem file needs drums, bass, other and vocals; missing: {', '.join(missing)}")
    files = [sf.SoundFile(str(stems[n])) for n in NI_ORDER]
    try:
        rate = files[0].samplerate
        if any(f.samplerate != rate for f in files):
            raise AudioError("the stems' sample rates differ")
        out = av.open(str(dest), "w", format="mp4")
        try:
            tracks = []
            for _ in range(5):
                stream = out.add_stream("aac", rate=rate, layout="stereo")
                stream.bit_rate = bit_rate
                tracks.append(stream)
            pts = 0
            while True:
                blocks = [_stereo(f.read(BLOCK, dtype="float32", always_2d=True)) for f in files]
                n = max(b.shape[1] for b in blocks)
                if n == 0:
                    break
                blocks = [np.pad(b, ((0, 0), (0, n - b.shape[1]))) for b in blocks]
                for stream, data in zip(tracks, [functools.reduce(np.add, blocks), *blocks]):
                    frame = av.AudioFrame.from_ndarray(
                        np.ascontiguousarray(np.clip(data, -1, 1)), format="fltp", layout="stereo"
                    )
                    frame.sample_rate, frame.pts = rate, pts
                    out.mux(stream.encode(frame))
                pts += n
            for stream in tracks:
                out.mux(stream.encode(None))
        finally:
            out.close()
    finally:
        for f in files:
            f.close()
    add_user_box(dest, b"stem", json.dumps(metadata()).encode())
    return dest


def _stereo(block: np.ndarray) -> np.ndarray:
    """(frames, channels) from soundfile as (2, frames): mono is doubled."""
    data = block.T
    return np.repeat(data, 2, axis=0) if data.shape[0] == 1 else data[:2]
