"""The mastering presets: names, loudness targets and true-peak ceilings (pipelines/mastering.py renders them).

Apart from the renderer so that the API, which validates and describes presets, imports no scipy.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MasterPreset:
    name: str
    target_lufs: float
    ceiling_dbtp: float
    description: str


PRESETS: dict[str, MasterPreset] = {
    p.name: p
    for p in (
        MasterPreset("streaming", -14.0, -1.0, "streaming services' normalisation level (Spotify, YouTube, Tidal)"),
        MasterPreset("loud", -9.0, -1.0, "a loud club / CD master"),
        MasterPreset("podcast", -16.0, -1.5, "spoken word (Apple Podcasts' recommendation)"),
    )
}
